"""netsim_paper.audit: label flips, suspicion scores and their metrics (notebook 06), against plain references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from netsim.neighbours import neg_l2_distances, top_neighbours
from netsim_paper.audit.data import flip_labels
from netsim_paper.audit.metrics import auroc, auroc_null_sd, bootstrap_aurocs, midranks, precision_at_k, roc_curve
from netsim_paper.audit.scoring import euclidean_neighbours, label_disagreement, per_sample_loss
from netsim_paper.audit.train import embeddings, logits, out_of_fold_probabilities, train_classifier
from netsim_paper.mnist.speedup import mnist_cnn


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


def test_flip_labels_is_seeded_exact_and_always_wrong():
    labels = torch.arange(1000) % 10
    noisy, flipped = flip_labels(labels, 0.05, seed=3)
    again, flipped_again = flip_labels(labels, 0.05, seed=3)
    assert torch.equal(noisy, again) and torch.equal(flipped, flipped_again)
    assert int(flipped.sum()) == 50
    assert torch.equal(flipped, noisy != labels)                  # every flip changes the class, nothing else changes
    assert noisy.min() >= 0 and noisy.max() <= 9 and noisy.dtype == torch.int64
    other, _ = flip_labels(labels, 0.05, seed=4)
    assert not torch.equal(noisy, other)
    assert not flip_labels(labels, 0.0, seed=0)[1].any()
    assert flip_labels(labels, 1.0, seed=0)[1].all()


def test_flipped_classes_are_spread_over_the_other_classes():
    labels = torch.zeros(9000, dtype=torch.long)
    noisy, _ = flip_labels(labels, 1.0, seed=0)
    counts = torch.bincount(noisy, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 850               # ~1000 each of classes 1..9


@pytest.mark.parametrize("labels, fraction", [
    (torch.tensor([0.0, 1.0]), 0.5), (torch.tensor([0, 10]), 0.5), (torch.tensor([0, 1]), 1.5),
    (torch.tensor([[0, 1]]), 0.5),
])
def test_flip_labels_refuses_bad_input(labels, fraction):
    with pytest.raises(ValueError):
        flip_labels(labels, fraction, seed=0)


def test_label_disagreement_on_a_toy_example():
    labels = torch.tensor([0, 0, 1, 1, 1])
    neighbours = torch.tensor([[1, 2], [0, 4], [3, 4], [2, 0], [0, 1]])
    assert label_disagreement(labels, neighbours).tolist() == [0.5, 0.5, 0.0, 0.5, 1.0]
    queries = label_disagreement(labels, torch.tensor([[2, 3, 4], [0, 1, 2]]), torch.tensor([1, 1]))
    assert queries.tolist() == pytest.approx([0.0, 2 / 3])


@pytest.mark.parametrize("neighbours, query_labels", [
    (torch.tensor([[0, 5]]), torch.tensor([0])),        # index out of range
    (torch.tensor([0, 1]), None),                       # not (Q, k)
    (torch.tensor([[0, 1]]), torch.tensor([0, 1])),     # one query label per row
])
def test_label_disagreement_refuses_bad_input(neighbours, query_labels):
    with pytest.raises(ValueError):
        label_disagreement(torch.tensor([0, 1, 1]), neighbours, query_labels)


@pytest.mark.parametrize("block", [1, 7, 512])
def test_euclidean_neighbours_match_the_full_distance_matrix(block):
    features = torch.randn(60, 3, 4, generator=torch.Generator().manual_seed(0))
    values, indices = euclidean_neighbours(features, 5, block=block)
    ref_indices, ref_values = top_neighbours(neg_l2_distances(features), k=5)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(values.double(), ref_values, atol=1e-4, rtol=1e-4)
    queries = torch.randn(9, 3, 4, generator=torch.Generator().manual_seed(1))
    _, q_indices = euclidean_neighbours(features, 4, queries=queries, block=block)
    full = -torch.cdist(queries.reshape(9, -1).double(), features.reshape(60, -1).double())
    assert torch.equal(q_indices, top_neighbours(full, k=4, exclude_self=False)[0])


def test_euclidean_neighbours_keep_duplicates_but_not_self():
    features = torch.tensor([[0.0], [0.0], [5.0]])
    _, indices = euclidean_neighbours(features, 1)
    assert indices.flatten().tolist()[:2] == [1, 0] and indices[2, 0] in (0, 1)
    with pytest.raises(ValueError):
        euclidean_neighbours(features, 3)
    with pytest.raises(ValueError):
        euclidean_neighbours(features, 1, queries=torch.zeros(2, 2))


def test_per_sample_loss_is_minus_the_log_probability_of_the_label():
    out = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9, 1, 1, 5])
    expected = -torch.log_softmax(out, 1)[torch.arange(6), labels]
    torch.testing.assert_close(per_sample_loss(out, labels), expected)


def test_training_is_seeded_and_embeddings_feed_the_last_layer():
    images = torch.randn(48, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(48) % 10
    models = [mnist_cnn(seed=1) for _ in range(2)]
    losses = [train_classifier(m, images, labels, epochs=2, batch_size=16, lr=1e-3, seed=2) for m in models]
    assert losses[0] == losses[1] and len(losses[0]) == 2 and losses[0][1] < losses[0][0]
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    features = embeddings(models[0], images)
    assert features.shape == (48, 256)
    torch.testing.assert_close(models[0][-1](features), logits(models[0], images))
    with pytest.raises(ValueError):
        train_classifier(models[0], images, labels[:5], epochs=1, batch_size=16, lr=1e-3, seed=0)


def test_out_of_fold_probabilities_come_from_models_that_never_saw_the_sample():
    images = torch.randn(30, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(30) % 10
    built = []

    def build(fold):
        built.append(mnist_cnn(seed=fold))
        return built[-1]

    probabilities = out_of_fold_probabilities(build, images, labels, folds=3, seed=0, epochs=1, batch_size=8, lr=1e-3)
    assert probabilities.shape == (30, 10) and len(built) == 3
    torch.testing.assert_close(probabilities.sum(1), torch.ones(30))
    held_out = torch.tensor_split(torch.randperm(30, generator=torch.Generator().manual_seed(0)), 3)
    for model, rows in zip(built, held_out, strict=True):
        torch.testing.assert_close(probabilities[rows], torch.softmax(model(images[rows]), 1))
    with pytest.raises(ValueError):
        out_of_fold_probabilities(build, images, labels, folds=1, seed=0, epochs=1, batch_size=8, lr=1e-3)
