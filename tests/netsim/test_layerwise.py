"""Every per-layer rule against the full-model Jacobians of per_sample_grads."""

import pytest
import torch
from torch import nn

import netsim
from conftest import SmallCNN, jacobian_grads, mlp
from netsim import layerwise, without_inplace
from netsim_paper.mnist.speedup import mnist_cnn


def _models():
    seq = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 4))
    conv_stride = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1, dilation=1), nn.PReLU(3),
                                nn.Conv2d(3, 2, 2, bias=False), nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    return {
        "mlp": (mlp(d_out=4, seed=1), torch.randn(6, 3)),
        "layernorm": (seq, torch.randn(6, 3)),
        "cnn_bn": (SmallCNN(d_out=4).eval(), torch.randn(5, 1, 8, 8)),
        "conv_stride_prelu": (conv_stride, torch.randn(5, 1, 8, 8)),
        "mnist_cnn": (mnist_cnn(0), torch.randn(3, 1, 28, 28)),
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("d", [1, 2, 4])
def test_factors_equal_the_jacobians(name, d):
    model, x = _models()[name]

    def output_fn(out):
        return out[:, :d]

    factors = layerwise.factorise(model, x, output_fn)
    J = jacobian_grads(model, x, output_fn)
    torch.testing.assert_close(layerwise.materialise(factors), J, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layerwise.self_gram(factors), J @ J.transpose(1, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "conv_stride_prelu"])
def test_gram_transform_and_sums_equal_dense_formulas(name):
    model, x = _models()[name]
    y = x.flip(0)[:3] * 0.5

    def output_fn(out):
        return out[:, :2]

    fx, fy = layerwise.factorise(model, x, output_fn), layerwise.factorise(model, y, output_fn)
    Jx, Jy = jacobian_grads(model, x, output_fn), jacobian_grads(model, y, output_fn)
    full = torch.einsum("iap,jbp->ijab", Jx, Jy)
    torch.testing.assert_close(layerwise.gram(fx, fy, trace=False), full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layerwise.gram(fx, fy, trace=True), full.diagonal(dim1=-2, dim2=-1).sum(-1),
                               rtol=1e-4, atol=1e-5)
    left = torch.randn(x.shape[0], 2, 2)
    torch.testing.assert_close(layerwise.materialise(layerwise.transform(fx, left)), left @ Jx, rtol=1e-4, atol=1e-5)
    sums = layerwise.add_sums(layerwise.summed(fy), layerwise.summed(fy))
    torch.testing.assert_close(layerwise.dot_with_sums(fx, sums), 2 * Jx @ Jy.sum(0).T, rtol=1e-4, atol=1e-4)


def test_frozen_parameters_are_left_out():
    model, x = mlp(d_out=2, seed=2), torch.randn(4, 3)
    model[0].bias.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    torch.testing.assert_close(layerwise.materialise(layerwise.factorise(model, x)),
                               jacobian_grads(model, x), rtol=1e-5, atol=1e-6)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def test_unsupported_structures_are_refused():
    with pytest.raises(layerwise.UnsupportedModel, match="2 times"):
        layerwise.factorise(_Twice(), torch.randn(2, 3))
    twice = nn.Linear(3, 3)
    registered_twice = nn.Sequential(twice, nn.Tanh(), twice)
    with pytest.raises(layerwise.UnsupportedModel, match="also registered"):
        layerwise.factorise(registered_twice, torch.randn(2, 3))


def test_tied_weights_sum_the_gradients_of_their_uses():
    """One parameter in two modules (GPT-2's lm_head is its token embedding): its per-sample gradient
    is the sum of both uses', laid out once, in named_parameters order; the untied bias stays apart."""
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    tied[2].weight = tied[0].weight
    x = torch.randn(5, 3, dtype=torch.float64)
    tied.double()
    factors = layerwise.factorise(tied, x)
    names = [n for f in factors for n in f.names]
    assert sorted(names) == sorted(dict(tied.named_parameters())) and len(names) == len(set(names))
    torch.testing.assert_close(layerwise.materialise(factors), jacobian_grads(tied, x), rtol=1e-12, atol=0)


def test_in_place_modifications_after_a_layer_are_handled():
    """ReLU(inplace=True) after a layer (the registration net's pattern): the recorded outputs
    are copies, the factors stay exact."""
    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 4), nn.ReLU(inplace=True),
                            nn.Linear(4, 1))
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(48, 2))
    for model, x in ((inplace, torch.randn(5, 3)), (conv, torch.randn(5, 2, 4, 4))):
        factors, copy = layerwise.factorise_layout(model, x)
        torch.testing.assert_close(layerwise.materialise(factors), jacobian_grads(model, x),
                                   rtol=1e-5, atol=1e-6)
        assert copy  # the caller keeps this and records copies from the start next time
        with pytest.raises(layerwise.InPlaceModified):
            layerwise.factorise(model, x, copy=False)
        torch.testing.assert_close(layerwise.materialise(layerwise.factorise(model, x[:2], copy=True)),
                                   jacobian_grads(model, x[:2]), rtol=1e-5, atol=1e-6)
        # the engine keeps that state per engine, not per process: a fresh engine finds it again
        engine = netsim.engine.engine_for(model, x, method="layerwise")
        assert engine.copy_records is True
        assert layerwise.factorise_layout(without_inplace(model), x)[1] is False


class _WeightReadByParent(nn.Module):
    """The decoder is the encoder's weight, read in the parent's forward: no hook sees that use."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.enc(x)) @ self.enc.weight


def test_a_parameter_used_outside_its_module_is_refused_not_summed_wrong():
    """The probe checks the factors' sum against autograd's gradient of the summed output: a missed use
    of a weight is refused (`layerwise`) or sends auto to the Jacobian engine, never a wrong kernel."""
    model, x = _WeightReadByParent(), torch.randn(5, 4)
    with pytest.raises(layerwise.UnsupportedModel, match="outside its module"):
        netsim.similarity(model, x, method="layerwise")
    torch.testing.assert_close(netsim.similarity(model, x), netsim.similarity(model, x, method="jacobian"))
