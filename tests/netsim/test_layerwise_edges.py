"""netsim.layerwise at the edges: in-place activations (without_inplace, copy recording),
frozen layers, non-finite factors, weight tying refused."""

import pytest
import torch
from torch import nn

from conftest import jacobian_grads, mlp
from netsim import NonFiniteError, layerwise, without_inplace


def _inplace_net():
    torch.manual_seed(51)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout(0.2, inplace=True),
                         nn.Flatten(), nn.Linear(2 * 25, 3), nn.LeakyReLU(inplace=True), nn.Linear(3, 1)).eval()


def test_without_inplace_returns_an_independent_copy_computing_the_same_function():
    model = _inplace_net()
    copy = without_inplace(model)
    assert all(not m.inplace for m in copy.modules() if hasattr(m, "inplace"))
    assert all(m.inplace for m in model.modules() if hasattr(m, "inplace"))        # the original is untouched
    assert not copy.training
    x = torch.randn(4, 1, 5, 5)
    torch.testing.assert_close(copy(x), model(x.clone()))
    with torch.no_grad():
        copy[0].weight.add_(1.0)                                    # parameters are copies, not shared
    assert not torch.equal(copy[0].weight, model[0].weight)
    with pytest.raises(TypeError, match="nn.Module"):
        without_inplace("model")


def test_copy_recording_is_only_used_when_needed():
    x = torch.randn(3, 1, 5, 5)
    model = _inplace_net()
    _, copy = layerwise.factorise_layout(model, x)
    assert copy is True
    _, copy = layerwise.factorise_layout(without_inplace(model), x)
    assert copy is False
    torch.testing.assert_close(layerwise.materialise(layerwise.factorise(without_inplace(model), x, copy=False)),
                               jacobian_grads(model, x), rtol=1e-5, atol=1e-6)


def test_frozen_layers_and_a_frozen_weight_with_a_trainable_bias():
    model = mlp(d_out=2, seed=52)
    model[0].requires_grad_(False)
    model[2].weight.requires_grad_(False)
    x = torch.randn(5, 3)
    torch.testing.assert_close(layerwise.materialise(layerwise.factorise(model, x)), jacobian_grads(model, x),
                               rtol=1e-5, atol=1e-6)


def test_non_finite_factors_name_the_sample():
    x = torch.randn(4, 3)
    x[1, 2] = float("-inf")
    with pytest.raises(NonFiniteError) as err:
        layerwise.factorise(mlp(), x)
    assert err.value.where == {"inputs": [1]}


def test_a_model_returning_a_tuple_asks_for_output_fn():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match="output_fn"):
        layerwise.factorise(Pair(), torch.randn(2, 3))
    assert layerwise.factorise(Pair(), torch.randn(2, 3), output_fn=lambda out: out[0])
