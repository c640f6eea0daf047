"""netsim_paper.audit.scoring: neighbour label disagreement, Euclidean neighbours and per-sample loss,
against full matrices and toy examples."""

from __future__ import annotations

import pytest
import torch

from netsim.neighbours import neg_l2_distances, top_neighbours
from netsim_paper.audit.scoring import euclidean_neighbours, label_disagreement, per_sample_loss


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
