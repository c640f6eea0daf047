"""netsim_paper.mnist.paper: the digitised Fig. 5 values agree with one another."""

from __future__ import annotations

import numpy as np
import pytest

from netsim_paper.mnist import paper


def test_each_curve_has_one_increasing_value_per_step():
    assert list(paper.STEPS) == sorted(paper.STEPS)
    for arm, values in paper.ACCURACY.items():
        assert len(values) == len(paper.STEPS), arm
        assert np.all(np.diff(values) > 0), arm


def test_steps_to_a_level_lie_where_the_digitised_curve_crosses_it():
    for arm, levels in paper.STEPS_TO.items():
        for level, step in levels.items():
            i = int(np.argmax(np.array(paper.ACCURACY[arm]) >= level))
            assert paper.ACCURACY[arm][i] >= level and paper.ACCURACY[arm][i - 1] < level, (arm, level)
            assert paper.STEPS[i - 1] < step <= paper.STEPS[i], (arm, level, step)


def test_accuracy_gap():
    assert paper.accuracy_gap(30) == pytest.approx(48.0 - 38.3)
    with pytest.raises(ValueError, match="digitised at steps"):
        paper.accuracy_gap(35)
