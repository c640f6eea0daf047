"""netsim_paper.registration.paper: the authors' registration numbers agree with one another and
with what the README and notebooks derive from them."""

import math

from netsim_paper.registration import paper


def test_the_headline_drop_is_the_papers_five_fold():
    """'dropped from 18 pixels to 3.5 pixels': the README's paper column reads 5.1x."""
    assert paper.FINAL_MEDIAN_PX < paper.NOISE_MEDIAN_PX
    assert f"{paper.NOISE_MEDIAN_PX / paper.FINAL_MEDIAN_PX:.1f}" == "5.1"


def test_the_talks_denoising_factor_sits_near_its_floor():
    """The talk's 0.02 against 1/sqrt(N) for its N patches: the README's '1.2x its own floor'."""
    floor = 1 / math.sqrt(paper.PATCHES)
    assert f"{floor:.3f}" == "0.017"
    assert f"{paper.DENOISING_FACTOR / floor:.1f}" == "1.2"


def test_patch_sampling_is_consistent():
    assert paper.PATCHES % paper.PATCHES_PER_TILE == 0
    assert 0 < paper.QUERIES < paper.PATCHES and paper.PATCH_PX > 0
    assert paper.SHIFT_PX > 0 and 0 < paper.DENOISING_FACTOR < 1
