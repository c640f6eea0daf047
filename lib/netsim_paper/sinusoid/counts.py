"""Fig. 4's analysis: every neighbour count of a sinusoid ensemble, its slope against f, and the
two kernel variants that explain why the soft count N_S barely falls.

For each trained network, one N x N k^C matrix gives every estimator at once (soft N_S, hard
N_tau, positive-only N_alpha^+; see `netsim.density.all_counts`). Two variants change the kernel,
not the network:

- A, `without_output_bias`: the output layer's bias left out of the gradients. Its gradient is 1
  for every input, so it adds 1 / (||grad f(x)|| ||grad f(x')||) to every k^C.
- B, `shared_direction_kernel`: the direction common to all gradients (the mean normalised
  gradient) projected out before normalising (`netsim.kernel.remove_shared_direction`).

Example:
    >>> from netsim_paper.sinusoid.data import train_sinusoid_ensemble
    >>> runs = train_sinusoid_ensemble([1, 4], [0, 1], n=64, epochs=2, progress=False)
    >>> counts = count_neighbours(runs, [1, 4], [0, 1], taus=[0.9], alphas=[2])
    >>> counts.names, counts.counts["N_S"].shape
    (['N_S', 'N_tau=0.9', 'N_alpha=2^+'], (2, 2, 64))
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

import netsim
from netsim import density
from netsim.kernel import remove_shared_direction

from .. import stats
from .data import SinusoidRun, target_curvature


def without_output_bias(model: nn.Sequential) -> nn.Sequential:
    """A copy of `model` whose last layer's bias is frozen, so netsim leaves it out of the
    gradients (variant A). `model` itself is unchanged."""
    variant = copy.deepcopy(model)
    variant[-1].bias.requires_grad_(False)
    return variant


def shared_direction_kernel(model: nn.Module, inputs: Tensor) -> Tensor:
    """k^C with the direction shared by all gradients projected out (variant B).

    Args:
        model: the network, `(N, 2) -> (N, d)`.
        inputs: `(N, 2)`.

    Returns:
        `(N, N)` kernel of the projected gradients.
    """
    J = netsim.per_sample_grads(model, inputs, method="jacobian")
    return netsim.similarity_from_jacobians(remove_shared_direction(J))


def _counts(kc: Tensor, taus: Sequence[float], alphas: Sequence[float]) -> dict[str, np.ndarray]:
    return {name: value.numpy() for name, value in density.all_counts(kc, taus, alphas).items()}


@dataclass(frozen=True)
class EnsembleCounts:
    """The neighbour counts of every (frequency, seed) network, F frequencies x S seeds x N samples.

    Attributes:
        frequencies: `(F,)` the target frequencies f.
        seeds: the S run seeds.
        counts: estimator name -> `(F, S, N)` counts with all parameters.
        counts_without_output_bias: the same, variant A.
        counts_shared_direction_removed: the same, variant B.
        mean_kc: `(F, S)` mean k^C over all N^2 pairs (self pairs included), all parameters.
        mean_kc_without_output_bias: `(F, S)` the same, variant A.
        mean_kc_shared_direction_removed: `(F, S)` the same, variant B.
        output_bias_share: `(F, S)` mean over samples of the output bias's share of
            ||grad f(x)||^2, i.e. 1 / ||grad f(x)||^2.
        alpha: `(F, S, N)` each sample's position on the circle, in the counts' order.
        fast_vs_dense_max_rel_gap: largest relative gap, over all networks and samples, between
            `netsim.soft_density` (two passes) and N_S read from the dense matrix (the relative
            gap's denominator is at least 1).
    """

    frequencies: np.ndarray
    seeds: list[int]
    counts: dict[str, np.ndarray]
    counts_without_output_bias: dict[str, np.ndarray]
    counts_shared_direction_removed: dict[str, np.ndarray]
    mean_kc: np.ndarray
    mean_kc_without_output_bias: np.ndarray
    mean_kc_shared_direction_removed: np.ndarray
    output_bias_share: np.ndarray
    alpha: np.ndarray
    fast_vs_dense_max_rel_gap: float

    @property
    def names(self) -> list[str]:
        """The estimator names, in `netsim.density.all_counts` order."""
        return list(self.counts)


def count_neighbours(runs: Sequence[SinusoidRun], frequencies: Sequence[float], seeds: Sequence[int], *,
                     taus: Sequence[float], alphas: Sequence[float]) -> EnsembleCounts:
    """Every estimator, with all parameters and in both variants, for every run (models put in eval mode).

    Args:
        runs: one trained run per (frequency, seed) pair, in any order, all with the same N.
        frequencies: the F frequencies, in the order of the result's first axis.
        seeds: the S seeds, in the order of its second axis.
        taus: thresholds of the hard counts.
        alphas: exponents of the positive counts.

    Raises:
        ValueError: a (frequency, seed) pair without exactly one run.
    """
    freqs = [float(f) for f in frequencies]
    seeds = [int(s) for s in seeds]
    pairs = sorted((float(r.frequency), int(r.seed)) for r in runs)
    if not pairs or pairs != sorted((f, s) for f in freqs for s in seeds):
        raise ValueError(f"need exactly one run per (frequency, seed) of {freqs} x {seeds}, got {pairs}")
    names = list(density.all_counts(torch.eye(2), taus, alphas))
    shape = (len(freqs), len(seeds), len(runs[0].data.alpha))
    counts, counts_a, counts_b = ({name: np.zeros(shape) for name in names} for _ in range(3))
    mean_kc, mean_kc_a, mean_kc_b, bias_share = (np.zeros(shape[:2]) for _ in range(4))
    alpha = np.zeros(shape)
    fast_gap = 0.0
    for run in runs:
        i, j = freqs.index(run.frequency), seeds.index(run.seed)
        model, x = run.model.eval(), run.data.inputs
        kc = netsim.similarity(model, x)
        per_run = _counts(kc, taus, alphas)
        fast = netsim.soft_density(model, x).numpy()
        fast_gap = max(fast_gap, float(np.max(np.abs(fast - per_run["N_S"]) / np.maximum(1, np.abs(per_run["N_S"])))))
        kc_a = netsim.similarity(without_output_bias(model), x)
        kc_b = shared_direction_kernel(model, x)
        for table, per in ((counts, per_run), (counts_a, _counts(kc_a, taus, alphas)),
                           (counts_b, _counts(kc_b, taus, alphas))):
            for name in names:
                table[name][i, j] = per[name]
        mean_kc_b[i, j] = kc_b.mean().item()
        alpha[i, j] = run.data.alpha.numpy()
        sq_norm = netsim.per_sample_grads(model, x, method="jacobian").pow(2).sum((1, 2))
        bias_share[i, j] = (1.0 / sq_norm).mean().item()
        mean_kc[i, j], mean_kc_a[i, j] = kc.mean().item(), kc_a.mean().item()
    return EnsembleCounts(np.array(freqs), seeds, counts, counts_a, counts_b, mean_kc, mean_kc_a, mean_kc_b,
                          bias_share, alpha, fast_gap)


def slope_summary(counts: Mapping[str, np.ndarray], frequencies: Sequence[float], *, n_boot: int,
                  seed: int) -> dict[str, dict]:
    """Fig. 4's summary of each estimator and its log-log slope against f.

    Args:
        counts: estimator name -> `(F, S, N)` counts.
        frequencies: `(F,)` the frequencies.
        n_boot: bootstrap replicates over seeds; seed: their RNG seed.

    Returns:
        name -> {"mean_count": (F,) list (median over seeds per sample, then mean over samples),
        "slope": least-squares log-log slope, "slope_ci": [low, high] 95% percentile bootstrap
        interval over seeds}; slope and slope_ci are None when a summary count is zero (no
        logarithm).
    """
    out = {}
    for name, c in counts.items():
        mean_count = stats.seed_summary(c)
        entry = {"mean_count": mean_count.tolist(), "slope": None, "slope_ci": None}
        if (mean_count > 0).all():
            slope, ci = stats.bootstrap_slope(frequencies, c, n_boot=n_boot, seed=seed)
            entry.update(slope=slope, slope_ci=list(ci))
        out[name] = entry
    return out


def format_slope(entry: Mapping) -> str:
    """"slope [low, high]" of one `slope_summary` entry, two decimals, or why it is undefined."""
    if entry["slope"] is None:
        return "undefined (zero count)"
    low, high = entry["slope_ci"]
    return f"{entry['slope']:.2f} [{low:.2f}, {high:.2f}]"


def curvature_correlation(alpha: np.ndarray, counts: np.ndarray, frequencies: Sequence[float]) -> dict[str, float]:
    """Rank correlation of a count with the local curvature of the target, per frequency.

    Ranks are `argsort(argsort(.))` (ties in sample order), pooled over seeds and samples.

    Args:
        alpha: `(F, S, N)` positions.
        counts: `(F, S, N)` one estimator's counts.
        frequencies: `(F,)`.

    Returns:
        f formatted with `:g` -> Spearman correlation.
    """
    def ranks(v: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(v))

    out = {}
    for i, f in enumerate(frequencies):
        kappa = target_curvature(torch.from_numpy(alpha[i].ravel()), f).numpy()
        out[f"{f:g}"] = float(np.corrcoef(ranks(kappa), ranks(counts[i].ravel()))[0, 1])
    return out
