"""netsim_paper.mnist.summary: Fig. 5's numbers from paired validation curves."""

from __future__ import annotations

import numpy as np
import pytest

from netsim_paper import stats
from netsim_paper.mnist.speedup import ArmsResult
from netsim_paper.mnist.summary import arm_summary, format_steps, paired_to_baseline


def _result():
    steps = np.array([0, 10, 20, 30])
    ce = np.array([[0.1, 0.3, 0.5, 0.7], [0.1, 0.3, 0.7, 0.9]])          # mean 10, 30, 60, 80 %
    paper = ce + np.array([[0.0, 0.1, 0.1, 0.0], [0.0, 0.1, 0.0, 0.1]])
    return ArmsResult(steps, {"ce": ce, "paper": paper}, {"ce": 1.0, "paper": 2.0})


def test_arm_summary_reads_the_mean_curve_in_percent():
    out = arm_summary(_result(), ["ce", "paper"], at_steps=(10, 20, 25), levels=(30, 45, 95))
    assert out["ce"]["acc_at"] == pytest.approx({"10": 30.0, "20": 60.0})      # 25 was not validated
    assert out["ce"]["steps_to"] == pytest.approx({"30": 10.0, "45": 15.0, "95": None})
    assert out["ce"]["final_acc"] == pytest.approx(80.0)
    assert out["paper"]["acc_at"] == pytest.approx({"10": 40.0, "20": 65.0})


def test_paired_difference_is_run_by_run_against_the_baseline():
    result = _result()
    d = paired_to_baseline(result, "paper", 20, n_boot=200, seed=1)
    assert d == stats.paired_difference(np.array([60.0, 70.0]), np.array([50.0, 70.0]), n_boot=200, seed=1)
    assert d["mean"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="not validated"):
        paired_to_baseline(result, "paper", 15, n_boot=10, seed=0)


def test_format_steps():
    assert format_steps(None) == "never"
    assert format_steps(43.6) == "44"
