"""Figs. 1-2 and 6-7: registration of aerial images to misaligned cadasters, self-denoising,
and what the registration network finds similar (synthetic scenes with exact truth)."""
