"""Registration of aerial images to misaligned cadasters (paper section 1): fields, networks, metrics."""
