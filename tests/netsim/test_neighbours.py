"""Top-k neighbours and neighbour-quality scores against brute-force references."""

import itertools
import math

import pytest
import torch

from netsim.neighbours import neg_l2_distances, neighbour_score, top_neighbours


def test_top_neighbours_excludes_self_and_breaks_ties_by_index():
    scores = torch.tensor([[9.0, 1.0, 1.0, 0.5],
                           [2.0, 9.0, 3.0, 3.0],
                           [0.0, 0.0, 9.0, 0.0]])
    index, value = top_neighbours(scores, k=2, query_index=torch.tensor([0, 1, 2]))
    assert index.tolist() == [[1, 2], [2, 3], [0, 1]]
    assert value.tolist() == [[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]]
    kept, _ = top_neighbours(scores, k=1, exclude_self=False)
    assert kept.flatten().tolist() == [0, 1, 2]


def test_top_neighbours_of_a_square_matrix_default_to_the_diagonal():
    x = torch.randn(12, 4)
    scores = neg_l2_distances(x)
    index, value = top_neighbours(scores, k=3)
    assert not (index == torch.arange(12)[:, None]).any()
    d = torch.cdist(x.double(), x.double()).fill_diagonal_(math.inf)
    torch.testing.assert_close(-value, d.sort(1).values[:, :3])
    sub = neg_l2_distances(x, torch.tensor([4, 7]))
    torch.testing.assert_close(sub, scores[[4, 7]])
    torch.testing.assert_close(top_neighbours(sub, k=3, query_index=torch.tensor([4, 7]))[0], index[[4, 7]])


def test_top_neighbours_errors():
    with pytest.raises(ValueError, match="query_index"):
        top_neighbours(torch.randn(2, 5), k=2)
    with pytest.raises(ValueError, match=r"k must lie in \[1, 4\]"):
        top_neighbours(torch.randn(5, 5), k=5)
    bad = torch.randn(3, 3)
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"NaN in rows \[1\]"):
        top_neighbours(bad, k=1)
    with pytest.raises(ValueError, match="non-empty"):
        top_neighbours(torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        top_neighbours(torch.randn(1, 3), k=1, query_index=torch.tensor([3]))


def test_random_baseline_is_the_exact_expectation_over_all_k_subsets():
    torch.manual_seed(0)
    values = torch.randn(7, 2)
    k, query = 3, 2
    others = [j for j in range(7) if j != query]
    dist = (values - values[query]).norm(dim=1).double()
    means = torch.tensor([dist[list(c)].mean().item() for c in itertools.combinations(others, k)], dtype=torch.float64)
    neighbours = torch.tensor([[0, 1, 3]])
    score = neighbour_score(values, neighbours, torch.tensor([query]))
    torch.testing.assert_close(score.random, means.mean().reshape(1))
    torch.testing.assert_close(score.random_sd, means.std(unbiased=False).reshape(1))
    torch.testing.assert_close(score.best, dist[others].sort().values[:k].mean().reshape(1))
    torch.testing.assert_close(score.neighbours, dist[[0, 1, 3]].mean().reshape(1))


def test_oracle_neighbours_have_skill_one_and_chance_has_skill_near_zero():
    torch.manual_seed(1)
    values = torch.randn(200)
    queries = torch.arange(0, 200, 10)
    oracle, _ = top_neighbours(neg_l2_distances(values[:, None], queries), k=5, query_index=queries)
    summary = neighbour_score(values, oracle, queries).summary()
    assert summary["skill"] == pytest.approx(1.0) and summary["better_than_random"] == 1.0 and summary["z"] > 5
    chance, _ = top_neighbours(torch.randn(len(queries), 200), k=5, query_index=queries)
    summary = neighbour_score(values, chance, queries).summary()
    assert abs(summary["skill"]) < 0.3 and abs(summary["z"]) < 4
    assert summary["queries"] == 20 and summary["k"] == 5


def test_unknown_attributes_are_skipped():
    values = torch.tensor([[0.0, 0.0], [1.0, 0.0], [math.nan, 0.0], [3.0, 0.0]])
    score = neighbour_score(values, torch.tensor([[1, 2], [0, 1]]), torch.tensor([0, 2]))
    assert score.neighbours[0] == 1.0                         # the NaN neighbour is skipped
    assert score.random[0] == pytest.approx(2.0)              # mean of |0 - 1| and |0 - 3|
    assert math.isnan(score.neighbours[1]) and math.isnan(score.random[1])
    assert score.summary()["queries"] == 1
    with pytest.raises(ValueError, match="no query"):
        neighbour_score(values, torch.tensor([[0, 1]]), torch.tensor([2])).summary()


def test_neighbour_score_errors():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        neighbour_score(torch.zeros(3), torch.tensor([[3]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="query_index has 2 entries for 1"):
        neighbour_score(torch.zeros(3), torch.tensor([[1]]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, m\)"):
        neighbour_score(torch.zeros(3, 1, 1), torch.tensor([[1]]), torch.tensor([0]))
