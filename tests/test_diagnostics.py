"""Diagnostics: two-pass fast paths against dense per-sample formulas."""

import pytest
import torch

import netsim
from netsim import diagnostics

from conftest import mlp


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
@pytest.mark.parametrize("d", [1, 2])
def test_uncertainty_factor_matches_dense_formula(d, method):
    model = mlp(d_out=d, seed=20 + d)
    with torch.no_grad():  # a shared positive component keeps sum_x' k^I > 0, as with an output bias
        model[-1].bias.fill_(0.0)
    xs = torch.randn(25, 3)
    K = netsim.similarity(model, xs, kind="inner", reduce="none").double()     # (N, N, d, d)
    own = torch.diagonal(K[torch.arange(25), torch.arange(25)], dim1=-2, dim2=-1).sum(-1)
    total = torch.diagonal(K.sum(1), dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(diagnostics.uncertainty_factor(model, xs, chunk_size=6, method=method).double(),
                               own / total, rtol=1e-4, atol=1e-6)


def test_uncertainty_factor_rejects_non_positive_totals():
    """A bias-free tanh net is odd in x, so grad f(-x) = -grad f(x): against the reference {-x}
    the total similarity is -||grad f(x)||^2 < 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8, bias=False), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1, bias=False))
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"<= 0 for samples \[0, 1\]"):
        diagnostics.uncertainty_factor(model, x, reference=-x)


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
@pytest.mark.parametrize("d", [1, 2])
def test_kernel_average_matches_dense_per_sample_solve(d, method):
    model = mlp(d_out=d, seed=30 + d)
    xs, queries = torch.randn(20, 3), torch.randn(6, 3)
    values = torch.randn(20, d)
    K = netsim.similarity(model, queries, xs, kind="inner", reduce="none").double()  # (Q, N, d, d)
    expected = torch.linalg.solve(K.sum(1), torch.einsum("qnab,nb->qa", K, values.double()))
    got = diagnostics.kernel_average(model, xs, values, queries=queries, chunk_size=7, method=method)
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-4)


def test_kernel_average_of_a_constant_is_that_constant():
    model = mlp(d_out=2, seed=40)
    xs = torch.randn(15, 3)
    const = torch.tensor([[0.3, -1.2]]).expand(15, 2)
    torch.testing.assert_close(diagnostics.kernel_average(model, xs, const), const, rtol=1e-4, atol=1e-4)


def test_kernel_average_checks_shapes():
    model = mlp(d_out=2)
    with pytest.raises(ValueError, match="rows"):
        diagnostics.kernel_average(model, torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="d = 2"):
        diagnostics.kernel_average(model, torch.randn(5, 3), torch.randn(5, 3))


def test_fit_diagnostic_separates_isolated_and_crowded_points():
    n = 40
    targets = torch.linspace(-1, 1, n)
    isolated = diagnostics.fit_diagnostic(torch.eye(n), targets)
    assert isolated.overfit.all() and not isolated.underfit.any()
    torch.testing.assert_close(isolated.local_std, torch.zeros(n))
    crowded = diagnostics.fit_diagnostic(torch.ones(n, n), targets)
    assert crowded.underfit.all() and not crowded.overfit.any()
    torch.testing.assert_close(crowded.relative_std, torch.ones(n))
    # dense but homogeneous neighbourhoods (two clusters with one label each): not under-fit
    block = torch.block_diag(torch.ones(20, 20), torch.ones(20, 20))
    clustered = diagnostics.fit_diagnostic(block, (torch.arange(n) >= 20).float())
    assert not clustered.underfit.any() and not clustered.overfit.any()


def test_fit_diagnostic_input_errors():
    with pytest.raises(ValueError, match="same N"):
        diagnostics.fit_diagnostic(torch.eye(3), torch.zeros(4))
    with pytest.raises(ValueError, match="all targets are equal"):
        diagnostics.fit_diagnostic(torch.eye(3), torch.zeros(3))
