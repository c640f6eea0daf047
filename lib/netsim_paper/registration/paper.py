"""What the authors report for the registration experiments (Figs. 1-2, 6-7), each with where it was read.

Sources (the texts in ``shared/paper/``): the paper (section 1 for Figs. 1-2, section 6 for
Figs. 6-7), the talk's slides (part IV-bis, the self-denoising estimate) and the authors'
released patch-sampling code (``sample_patches``, see `netsim_paper.registration.patches`).
Numbers are as printed; where the authors give a statement rather than a number, it is kept as
the phrase the notebooks quote.
"""

from __future__ import annotations

#: Median registration error (px) of the original annotations, measured on the manually aligned
#: bloomington22 tile. Paper, section 1 (lines 24-27): "dropped from 18 pixels to 3.5 pixels"; Fig. 2.
NOISE_MEDIAN_PX: float = 18.0

#: Median registration error (px) after the multi-round training (the curve of round 2 in Fig. 2).
#: Paper, section 1 (line 27), same sentence.
FINAL_MEDIAN_PX: float = 3.5

#: Round 3 against round 2. Paper, section 6 (lines 226-227): "By round 3, the multiple-rounds
#: method has already converged (see Fig.2, the grey curve is on top of the green one)".
ROUND_3: str = "≈ round 2"

#: The control trained on ground truth with added noise (dashed lines of Fig. 2). Paper, section 1
#: (lines 29-30): "the new results were about as good again".
EXTRA_NOISE_CONTROL: str = "about as good again"

#: Fig. 6-7 patches: side in pixels of the 4x-downsampled Inria tiles, patches per tile, their
#: total over the training tiles, and the query patches shown. From the authors' released code
#: (``sample_patches``) as this project's earlier notes describe it (`patches` module docstring);
#: none of them is in the stored paper, poster or talk texts, whose section 6 says only "a
#: sampling of input patches of the training dataset" and shows one query in Fig. 6 ("the same
#: behavior in 19 other input patches", line 226, for Fig. 7).
PATCH_PX: int = 124
PATCHES_PER_TILE: int = 10
PATCHES: int = 3600
QUERIES: int = 10

#: Fig. 7. Paper, section 6 (lines 224-225): "round 2 is quite different in that the patch is
#: closer to all other patches than in other rounds".
FIG7_ROUND_2: str = "round 2 shifted right"

#: The predicted self-denoising factor, "≃ constant" over the patches. Talk, part IV-bis, slide
#: "From similarity statistics to self-denoising effect estimation": "denoising factor: 0.02".
DENOISING_FACTOR: float = 0.02

#: The shift ||ŷ_i - E_k[ŷ]_i||, "varying". Same slide: "Shift: 4.4 px (varying)".
SHIFT_PX: float = 4.4
