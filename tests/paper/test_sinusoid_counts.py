"""netsim_paper.sinusoid.counts: Fig. 4's counts and variants against plain per-sample gradient loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import reference_jacobians
from netsim_paper.sinusoid.counts import (
    count_neighbours,
    curvature_correlation,
    format_slope,
    slope_summary,
    without_output_bias,
)
from netsim_paper.sinusoid.data import target_curvature, train_sinusoid_ensemble

FREQS, SEEDS, TAUS, ALPHAS = [1, 4], [0, 3], [0.5, 0.9], [2]


@pytest.fixture(scope="module")
def runs():
    return train_sinusoid_ensemble(FREQS, SEEDS, n=24, epochs=2, batch_size=8, hidden=8, depth=1,
                                   progress=False)


@pytest.fixture(scope="module")
def counts(runs):
    return count_neighbours(runs[::-1], FREQS, SEEDS, taus=TAUS, alphas=ALPHAS)   # any run order


def _correlation(J):
    """k^C of one-output Jacobians, (N, 1, p) -> (N, N): cosines of the gradients."""
    g = J[:, 0].double()
    g = g / g.norm(dim=1, keepdim=True)
    return g @ g.T


def test_counts_and_means_equal_a_plain_gradient_loop(runs, counts):
    assert counts.names == ["N_S", "N_tau=0.5", "N_tau=0.9", "N_alpha=2^+"]
    for run in runs:
        i, j = FREQS.index(run.frequency), SEEDS.index(run.seed)
        J = reference_jacobians(run.model, run.data.inputs)
        kc = _correlation(J)
        off_self = kc - torch.diag(torch.diag(kc)) * 2          # self pairs below every threshold
        np.testing.assert_allclose(counts.counts["N_S"][i, j], kc.sum(1), rtol=1e-4)
        np.testing.assert_allclose(counts.counts["N_tau=0.9"][i, j], (off_self >= 0.9).sum(1), atol=0)
        np.testing.assert_allclose(counts.counts["N_alpha=2^+"][i, j], off_self.clamp_min(0).pow(2).sum(1),
                                   rtol=1e-4, atol=1e-5)
        assert counts.mean_kc[i, j] == pytest.approx(kc.mean().item(), abs=1e-5)
        # Variant A: the output bias is the last parameter, with gradient 1 for every input.
        assert torch.equal(J[:, 0, -1], torch.ones(len(J)))
        assert counts.mean_kc_without_output_bias[i, j] == pytest.approx(_correlation(J[..., :-1]).mean().item(),
                                                                         abs=1e-5)
        assert counts.output_bias_share[i, j] == pytest.approx((1 / J.double().pow(2).sum((1, 2))).mean().item(),
                                                               rel=1e-5)
        # Variant B: the mean normalised gradient projected out.
        g = J[:, 0].double() / J[:, 0].double().norm(dim=1, keepdim=True)
        shared = g.mean(0) / g.mean(0).norm()
        projected = J[:, 0].double() - (J[:, 0].double() @ shared)[:, None] * shared
        kc_b = _correlation(projected[:, None])
        assert counts.mean_kc_shared_direction_removed[i, j] == pytest.approx(kc_b.mean().item(), abs=1e-5)
        np.testing.assert_allclose(counts.counts_shared_direction_removed["N_S"][i, j], kc_b.sum(1),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(counts.alpha[i, j], run.data.alpha.numpy())
    assert counts.fast_vs_dense_max_rel_gap < 1e-4


def test_a_missing_or_repeated_run_is_an_error(runs):
    with pytest.raises(ValueError, match="one run per"):
        count_neighbours(runs[:-1], FREQS, SEEDS, taus=TAUS, alphas=ALPHAS)
    with pytest.raises(ValueError, match="one run per"):
        count_neighbours(runs + runs[:1], FREQS, SEEDS, taus=TAUS, alphas=ALPHAS)
    with pytest.raises(ValueError, match="one run per"):
        count_neighbours([], [], [], taus=TAUS, alphas=ALPHAS)


def test_without_output_bias_leaves_the_model_alone(runs):
    model = runs[0].model
    variant = without_output_bias(model)
    assert model[-1].bias.requires_grad and not variant[-1].bias.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), variant.parameters()))


def test_slope_summary_of_an_exact_power_law():
    freqs = np.array([1.0, 2.0, 4.0, 8.0])
    rng = np.random.default_rng(0)
    scale = rng.uniform(1, 2, (1, 3, 5))                    # (F, S, N) counts = scale / f
    table = {"N_S": scale / freqs[:, None, None], "N_tau=0.9": np.zeros((4, 3, 5))}
    out = slope_summary(table, freqs, n_boot=50, seed=0)
    assert out["N_S"]["slope"] == pytest.approx(-1)
    assert out["N_S"]["slope_ci"] == pytest.approx([-1, -1])
    np.testing.assert_allclose(out["N_S"]["mean_count"], np.median(scale, 1).mean() / freqs)
    assert out["N_tau=0.9"] == {"mean_count": [0.0] * 4, "slope": None, "slope_ci": None}
    assert format_slope(out["N_S"]) == "-1.00 [-1.00, -1.00]"
    assert format_slope(out["N_tau=0.9"]) == "undefined (zero count)"


def test_curvature_correlation_is_a_rank_correlation():
    alpha = np.random.default_rng(1).uniform(0, 1, (2, 2, 50))
    freqs = [1, 2]
    kappa = np.stack([target_curvature(torch.from_numpy(alpha[i]), f).numpy() for i, f in enumerate(freqs)])
    assert curvature_correlation(alpha, kappa ** 3, freqs) == pytest.approx({"1": 1.0, "2": 1.0})
    assert curvature_correlation(alpha, -kappa, freqs) == pytest.approx({"1": -1.0, "2": -1.0})
