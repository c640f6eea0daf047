"""netsim.density at the edges: streamed hard and positive counts (no N x N matrix), ties at the
threshold across engines, empty and short reference sets, options that do not apply."""


import pytest
import torch

import netsim
from conftest import SmallCNN, mlp
from netsim import density

METHODS = ("jacobian", "layerwise")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("estimator", ["hard", "positive"])
def test_streamed_counts_equal_the_counts_of_the_full_matrix(method, estimator):
    """Many row blocks (a tiny block budget) and a short last chunk: the same counts as the
    estimators applied to the whole matrix."""
    model, xs = mlp(d_out=2, seed=21, hidden=6), torch.randn(37, 3)
    kc = netsim.similarity(model, xs, method=method)
    expected = density.counts_from_kernel(kc, estimator, tau=0.3, alpha=1.5)
    got = netsim.neighbour_counts(model, xs, estimator=estimator, tau=0.3, alpha=1.5, method=method,
                                  chunk_size=5, memory_budget=3000)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("estimator", ["hard", "positive", "soft"])
def test_counts_of_a_cnn_with_class_targets_agree_across_engines(estimator):
    cnn, images = SmallCNN(d_out=3).eval(), torch.randn(11, 1, 8, 8)
    labels = torch.randint(0, 3, (11,))
    counts = [netsim.neighbour_counts(cnn, images, estimator=estimator, tau=0.2, method=method, chunk_size=4,
                                      output_fn=netsim.outputs.class_vs_rest, targets=labels) for method in METHODS]
    torch.testing.assert_close(counts[0], counts[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("d", [1, 2])
def test_duplicates_reach_tau_one_on_every_engine(d):
    """k^C = 1 between duplicate inputs up to rounding: at tau = 1 both engines count them."""
    model = mlp(d_out=d, seed=22, hidden=32)
    base = torch.randn(6, 3)
    xs = torch.cat([base, base[:3], base[:1]])         # sample 0 three times, 1 and 2 twice
    expected = torch.tensor([2.0, 1, 1, 0, 0, 0, 2, 1, 1, 2])
    for method in METHODS:
        torch.testing.assert_close(netsim.neighbour_counts(model, xs, tau=1.0, method=method, chunk_size=3),
                                   expected)
        torch.testing.assert_close(density.hard_count(netsim.similarity(model, xs, method=method), 1.0), expected)


def test_a_single_reference_sample_and_a_single_query():
    model, xs = mlp(d_out=2, seed=23), torch.randn(5, 3)
    k = netsim.similarity(model, xs, xs[:1])
    torch.testing.assert_close(netsim.soft_density(model, xs, reference=xs[:1]), k[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(netsim.soft_density(model, xs[2:3], reference=xs),
                               netsim.similarity(model, xs[2:3], xs).sum(1), rtol=1e-5, atol=1e-5)


def test_soft_density_reference_checks():
    model, xs = mlp(), torch.randn(4, 3)
    with pytest.raises(ValueError, match="reference must be a non-empty"):
        netsim.soft_density(model, xs, reference=xs[:0])
    with pytest.raises(ValueError, match="reference_targets has 3 rows for 4 reference"):
        netsim.soft_density(model, xs, reference=xs, output_fn=netsim.outputs.class_vs_rest,
                            reference_targets=torch.zeros(3, dtype=torch.long))


def test_options_that_do_not_apply_are_refused_not_dropped():
    model, xs = mlp(), torch.randn(4, 3)
    with pytest.raises(TypeError, match="'progress'"):
        netsim.neighbour_counts(model, xs, estimator="soft", progress=True)
    with pytest.raises(TypeError, match="'kind'"):
        netsim.neighbour_counts(model, xs, kind="inner")      # the counts are defined on k^C
    with pytest.raises(ValueError, match="tau"):
        netsim.neighbour_counts(model, xs, tau=True)
