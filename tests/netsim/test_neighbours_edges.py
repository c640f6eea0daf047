"""netsim.neighbours at the edges: the smallest sets, infinite scores, k at its bounds."""

import math

import pytest
import torch

from netsim.neighbours import neighbour_score, top_neighbours


def test_two_samples_and_k_at_its_bounds():
    scores = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    index, value = top_neighbours(scores, k=1)
    assert index.tolist() == [[1], [0]] and value.tolist() == [[0.5], [0.5]]
    with pytest.raises(ValueError, match=r"k must lie in \[1, 1\]"):
        top_neighbours(scores, k=2)
    assert top_neighbours(scores, k=2, exclude_self=False)[0].tolist() == [[0, 1], [1, 0]]


def test_infinite_scores_are_ordered_and_nan_scores_refused():
    scores = torch.tensor([[0.0, -math.inf, math.inf], [1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    assert top_neighbours(scores, k=2)[0].tolist() == [[2, 1], [2, 0], [0, 1]]
    scores[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN in rows \[1\]"):
        top_neighbours(scores, k=1)


def test_a_single_query_against_many_samples():
    values = torch.arange(5.0)
    score = neighbour_score(values, torch.tensor([[3]]), torch.tensor([2]))
    assert score.neighbours.tolist() == [1.0] and score.best.tolist() == [1.0]
