"""How well a suspicion score finds the positives (flipped labels, misclassified images).

Scores are "higher = more suspicious". `auroc`, `precision_at_k` and `roc_curve` treat tied
scores as a random order among themselves and return its expectation, so a coarse score (e.g. a
fraction of 10 neighbours) is neither favoured nor penalised by how ties happen to be broken.
`auroc_null_sd` is the chance spread of an AUROC, `bootstrap_aurocs` paired resampled intervals.

Example:
    >>> import numpy as np
    >>> auroc(np.array([0.9, 0.8, 0.3, 0.1]), np.array([True, False, True, False]))
    0.75
    >>> precision_at_k(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False]), 2)
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def _check(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives)
    if scores.ndim != 1 or positives.shape != scores.shape:
        raise ValueError(f"need 1-D scores and positives of one length, got {scores.shape} and {positives.shape}")
    if positives.dtype != np.bool_:
        raise ValueError(f"positives must be booleans, got dtype {positives.dtype}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(scores)).sum())} are not")
    return scores, positives


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks in increasing order, ties sharing the mean of the ranks they span."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def auroc(scores, positives) -> float:
    """Area under the ROC curve: P(score of a random positive > that of a random negative), ties counting 1/2.

    Args:
        scores: `(N,)` finite suspicion scores.
        positives: `(N,)` bool, the samples to find.

    Raises:
        ValueError: shapes, non-finite scores, or no positive or no negative.
    """
    scores, positives = _check(scores, positives)
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {n_pos} and {n_neg}")
    rank_sum = midranks(scores)[positives].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_at_k(scores, positives, k: int) -> float:
    """Fraction of positives among the `k` highest scores (expected over the order of tied scores).

    Args:
        scores: `(N,)` finite suspicion scores.
        positives: `(N,)` bool.
        k: how many samples are flagged, 1..N (e.g. the number of positives).

    Raises:
        ValueError: shapes, non-finite scores, k out of range.
    """
    scores, positives = _check(scores, positives)
    if isinstance(k, bool) or not 1 <= k <= len(scores):
        raise ValueError(f"k must lie in [1, {len(scores)}], got {k!r}")
    threshold = np.sort(scores)[::-1][k - 1]
    above, tied = scores > threshold, scores == threshold
    needed = k - int(above.sum())   # of the tied group, this many are flagged: a random subset of it
    return float((positives[above].sum() + needed * positives[tied].mean()) / k)


def auroc_null_sd(n_positives: int, n_negatives: int) -> float:
    """Standard deviation of the AUROC of a score unrelated to the labels (the Mann-Whitney null).

    sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)), the no-ties value: ties only lower it, so a
    margin of a few of these over 0.5 is a conservative test that a score finds anything.
    """
    if n_positives < 1 or n_negatives < 1:
        raise ValueError(f"need positives and negatives, got {n_positives} and {n_negatives}")
    return math.sqrt((n_positives + n_negatives + 1) / (12.0 * n_positives * n_negatives))


def bootstrap_aurocs(scores: Mapping[str, np.ndarray], positives, *, n_boot: int, seed: int) -> dict[str, np.ndarray]:
    """AUROCs of several scores on the same bootstrap resamples of the samples (paired).

    Each resample draws N samples with replacement (seeded), the same for every score, so the
    differences between two scores' replicates give a paired interval of their difference.

    Args:
        scores: name -> `(N,)` finite scores; positives: `(N,)` bool.
        n_boot: resamples; seed: their seed.

    Returns:
        name -> `(n_boot,)` AUROC replicates (a resample without a positive or a negative is redrawn).
    """
    checked = {name: _check(s, positives) for name, s in scores.items()}
    positives = np.asarray(positives)
    rng = np.random.default_rng(seed)
    out = {name: np.empty(n_boot) for name in checked}
    b = 0
    while b < n_boot:
        rows = rng.integers(0, len(positives), len(positives))
        if positives[rows].all() or not positives[rows].any():
            continue
        for name, (s, p) in checked.items():
            out[name][b] = auroc(s[rows], p[rows])
        b += 1
    return out


def roc_curve(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve: false- and true-positive rates when flagging every score >= t, for each distinct t.

    Returns:
        `(fpr, tpr)`, each `(T + 1,)` from (0, 0) to (1, 1); its trapezoid area is `auroc` (tied
        scores join by a straight segment, the expectation over their order).
    """
    scores, positives = _check(scores, positives)
    n_pos = int(positives.sum())
    if n_pos == 0 or n_pos == len(positives):
        raise ValueError("a ROC curve needs positives and negatives")
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], positives[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]   # end of each run of ties
    tp = np.cumsum(hits)[last_of_each]
    fp = last_of_each + 1 - tp
    return np.r_[0.0, fp / (len(positives) - n_pos)], np.r_[0.0, tp / n_pos]
