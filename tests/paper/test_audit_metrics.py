"""netsim_paper.audit.metrics: AUROC, ROC, precision@k and their null spread and bootstrap, against plain
references (pairwise definition, tie orders)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from netsim_paper.audit.metrics import auroc, auroc_null_sd, bootstrap_aurocs, midranks, precision_at_k, roc_curve


def reference_auroc(scores, positives):
    """The definition: over all (positive, negative) pairs, 1 if the positive scores higher, 1/2 if tied."""
    pos, neg = scores[positives], scores[~positives]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def reference_precision(scores, positives, k):
    """Mean over every order of the samples that sorts the scores decreasingly of the positives among the first k."""
    orders = [o for o in itertools.permutations(range(len(scores)))
              if all(scores[a] >= scores[b] for a, b in itertools.pairwise(o))]
    return float(np.mean([positives[list(o[:k])].mean() for o in orders]))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 5, 40).astype(float)           # many ties
    positives = rng.random(40) < 0.3
    assert auroc(scores, positives) == pytest.approx(reference_auroc(scores, positives), abs=1e-12)


def test_auroc_extremes():
    positives = np.array([True, True, False, False, False])
    assert auroc(np.array([5.0, 4, 3, 2, 1]), positives) == 1.0
    assert auroc(np.array([1.0, 2, 3, 4, 5]), positives) == 0.0
    assert auroc(np.zeros(5), positives) == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_area_is_the_auroc(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 50).astype(float)
    positives = rng.random(50) < 0.4
    fpr, tpr = roc_curve(scores, positives)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all() and len(fpr) == len(np.unique(scores)) + 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(scores, positives))


def test_midranks_share_the_ranks_of_ties():
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


@pytest.mark.parametrize("seed", range(5))
def test_precision_at_k_is_the_mean_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, 7).astype(float)
    positives = rng.random(7) < 0.5
    for k in range(1, 8):
        assert precision_at_k(scores, positives, k) == pytest.approx(reference_precision(scores, positives, k))


def test_precision_at_k_without_ties_counts_the_top_k():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(100)
    positives = rng.random(100) < 0.2
    top = np.argsort(-scores)[:20]
    assert precision_at_k(scores, positives, 20) == positives[top].mean()


@pytest.mark.parametrize("call", [
    lambda: auroc(np.ones(3), np.array([True, True, True])),          # no negative
    lambda: auroc(np.array([1.0, np.nan]), np.array([True, False])),
    lambda: auroc(np.ones(3), np.array([1, 0, 1])),                   # not booleans
    lambda: precision_at_k(np.ones(3), np.array([True, False, True]), 0),
    lambda: precision_at_k(np.ones(3), np.array([True, False]), 1),
])
def test_metrics_refuse_bad_input(call):
    with pytest.raises(ValueError):
        call()


def test_auroc_null_sd_is_the_spread_of_unrelated_scores():
    rng = np.random.default_rng(0)
    positives = np.arange(50) < 20
    spread = np.std([auroc(rng.standard_normal(50), positives) for _ in range(4000)])
    assert spread == pytest.approx(auroc_null_sd(20, 30), rel=0.05)
    with pytest.raises(ValueError):
        auroc_null_sd(0, 5)


def test_bootstrap_aurocs_are_paired_resamples():
    rng = np.random.default_rng(1)
    positives = rng.random(80) < 0.3
    scores = {"a": rng.standard_normal(80) + positives, "b": rng.standard_normal(80)}
    reps = bootstrap_aurocs(scores, positives, n_boot=50, seed=7)
    again = bootstrap_aurocs(scores, positives, n_boot=50, seed=7)
    assert all(np.array_equal(reps[k], again[k]) for k in scores) and reps["a"].shape == (50,)
    draw = np.random.default_rng(7).integers(0, 80, 80)   # the first resample, drawn by hand
    for name, s in scores.items():
        assert reps[name][0] == auroc(s[draw], positives[draw])
    assert reps["a"].mean() > reps["b"].mean()
