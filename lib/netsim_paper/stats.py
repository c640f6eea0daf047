"""Small statistics used by the figure notebooks: log-log slopes, bootstraps, paired intervals."""

from __future__ import annotations

import numpy as np


def loglog_slope(x, y) -> float:
    """Least-squares slope of log y against log x (the exponent of a power law y ~ x^slope).

    Raises:
        ValueError: fewer than two points, or a non-positive value (no logarithm).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("need two 1-D arrays of the same length >= 2")
    if (x <= 0).any() or (y <= 0).any():
        raise ValueError(f"log-log slope needs positive values, got x={x.tolist()}, y={y.tolist()}")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def seed_summary(counts: np.ndarray) -> np.ndarray:
    """The figure's statistic: median over seeds per sample, then mean over samples.

    Args:
        counts: `(F, S, N)` counts per frequency, seed and sample.

    Returns:
        `(F,)` summary per frequency.
    """
    counts = np.asarray(counts, dtype=float)
    if counts.ndim != 3 or 0 in counts.shape:
        raise ValueError(f"counts must be a non-empty (F, S, N) array, got shape {counts.shape}")
    return np.median(counts, axis=1).mean(axis=1)


def bootstrap_slope(x, counts: np.ndarray, *, n_boot: int = 2000, level: float = 0.95,
                    seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Log-log slope of `seed_summary(counts)` against x, with a percentile bootstrap over seeds.

    Each bootstrap replicate resamples the S seeds with replacement (the same draw for every
    frequency, as the runs are paired by seed) and recomputes the summary and its slope.

    Args:
        x: `(F,)` positive abscissae (the frequencies).
        counts: `(F, S, N)` per-sample counts.
        n_boot: replicates; level: interval coverage; seed: bootstrap RNG seed.

    Returns:
        (slope of the full data, (low, high) interval). Replicates whose summary has a zero are
        skipped (their slope is undefined); if more than 5% are, a ValueError says so.
    """
    counts = np.asarray(counts, dtype=float)
    slope = loglog_slope(x, seed_summary(counts))
    rng = np.random.default_rng(seed)
    n_seeds = counts.shape[1]
    slopes = []
    for _ in range(n_boot):
        summary = seed_summary(counts[:, rng.integers(0, n_seeds, n_seeds)])
        if (summary > 0).all():
            slopes.append(loglog_slope(x, summary))
    if len(slopes) < 0.95 * n_boot:
        raise ValueError(f"{n_boot - len(slopes)} of {n_boot} bootstrap summaries contain a zero count")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(slopes, [tail, 100 - tail])
    return slope, (float(low), float(high))


def paired_difference(a, b, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean of the paired differences a - b with a percentile bootstrap interval.

    The runs are paired (same initial weights, same batches), so the interval is that of the
    mean of the R per-pair differences, resampled with replacement.

    Args:
        a, b: `(R,)` the same R paired runs under two conditions.

    Returns:
        {"mean", "low", "high", "n"}.
    """
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if diff.ndim != 1 or len(diff) < 2:
        raise ValueError("need at least two paired runs")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high), "n": len(diff)}
