"""Statistics helpers against closed forms."""

import numpy as np
import pytest

from netsim_paper import stats


def test_loglog_slope_recovers_a_power_law():
    x = np.array([1, 2, 4, 8, 16])
    assert stats.loglog_slope(x, 3.0 * x ** -0.7) == pytest.approx(-0.7)


def test_loglog_slope_rejects_non_positive_values():
    with pytest.raises(ValueError, match="positive"):
        stats.loglog_slope([1, 2], [1, 0])


def test_seed_summary_is_median_over_seeds_then_mean_over_samples():
    counts = np.array([[[1, 10], [3, 20], [100, 30]]])   # F=1, S=3, N=2
    np.testing.assert_allclose(stats.seed_summary(counts), [(3 + 20) / 2])


def test_bootstrap_interval_contains_the_slope_and_shrinks_with_agreement():
    rng = np.random.default_rng(0)
    f = np.array([1, 2, 4, 8, 16.0])
    base = f[:, None, None] ** -0.5 * np.ones((5, 6, 50))
    noisy = base * np.exp(rng.normal(0, 0.3, (5, 6, 1)))
    slope, (lo, hi) = stats.bootstrap_slope(f, noisy, n_boot=500)
    assert lo <= slope <= hi
    exact, (elo, ehi) = stats.bootstrap_slope(f, base, n_boot=200)
    assert exact == pytest.approx(-0.5) and ehi - elo < 1e-9 < hi - lo


def test_paired_difference_interval():
    rng = np.random.default_rng(1)
    b = rng.normal(0, 1, 400)
    out = stats.paired_difference(b + 0.5 + rng.normal(0, 0.1, 400), b)
    assert out["low"] < 0.5 < out["high"] and out["high"] - out["low"] < 0.05 and out["n"] == 400
    with pytest.raises(ValueError):
        stats.paired_difference([1.0], [2.0])
