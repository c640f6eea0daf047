"""netsim.diagnostics at the edges: short last chunks, N = 1, non-finite data, frozen layers."""

import pytest
import torch

from conftest import mlp, reference_jacobians
from netsim import NonFiniteError, diagnostics


@pytest.mark.parametrize("method", ["jacobian", "layerwise"])
def test_short_last_chunks_change_nothing(method):
    model, xs = mlp(d_out=2, seed=61), torch.randn(11, 3)
    values = torch.randn(11, 2)
    for chunk in (3, 11, 64):
        torch.testing.assert_close(diagnostics.uncertainty_factor(model, xs, chunk_size=chunk, method=method),
                                   diagnostics.uncertainty_factor(model, xs, method="jacobian"), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(diagnostics.kernel_average(model, xs, values, chunk_size=chunk, method=method),
                                   diagnostics.kernel_average(model, xs, values, method="jacobian"),
                                   rtol=1e-3, atol=1e-4)


def test_a_single_sample_is_its_own_average():
    model, x = mlp(d_out=2, seed=62), torch.randn(1, 3)
    value = torch.randn(1, 2)
    torch.testing.assert_close(diagnostics.kernel_average(model, x, value), value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(diagnostics.uncertainty_factor(model, x), torch.ones(1))
    torch.testing.assert_close(diagnostics.denoising_factor(model, x), torch.ones(1, dtype=torch.float64))


def test_frozen_layers_are_left_out_of_the_sums():
    model, xs = mlp(d_out=2, seed=63), torch.randn(6, 3)
    model[0].requires_grad_(False)
    J = reference_jacobians(model, xs).double()
    K = torch.einsum("iap,jbp->ijab", J, J)
    torch.testing.assert_close(diagnostics.kernel_sums(model, xs).total, K.sum(1), rtol=1e-5, atol=1e-6)


def test_non_finite_inputs_are_named():
    xs = torch.randn(6, 3)
    xs[4] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        diagnostics.kernel_sums(mlp(), xs, chunk_size=2)
    assert err.value.indices == [4]
    with pytest.raises(NonFiniteError):
        diagnostics.uncertainty_factor(mlp(), xs)
