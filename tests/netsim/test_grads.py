"""per_sample_grads against a plain per-sample backward loop, and its input checks."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

import netsim
from conftest import SmallCNN, mlp, reference_jacobians
from netsim import outputs
from netsim.grads import iter_jacobians, output_dim


@pytest.mark.parametrize("d", [1, 2, 10])
def test_mlp_matches_reference_loop(d):
    model = mlp(d_out=d, seed=d)
    x = torch.randn(7, 3)
    J = netsim.per_sample_grads(model, x, chunk_size=3)
    assert J.shape == (7, d, netsim.num_parameters(model))
    torch.testing.assert_close(J, reference_jacobians(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [1, 2, 10])
def test_cnn_with_buffers_matches_reference_loop(d):
    model = SmallCNN(d_out=d).eval()
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(netsim.per_sample_grads(model, x), reference_jacobians(model, x),
                               rtol=1e-5, atol=1e-6)


def test_output_fn_with_targets_matches_reference_loop():
    model = mlp(d_out=10)
    x, y = torch.randn(6, 3), torch.randint(0, 10, (6,))
    J = netsim.per_sample_grads(model, x, output_fn=outputs.class_vs_rest, targets=y, chunk_size=4)
    assert J.shape[1] == 1
    torch.testing.assert_close(J, reference_jacobians(model, x, outputs.class_vs_rest, y), rtol=1e-5, atol=1e-6)


def test_frozen_parameters_are_left_out():
    model = mlp(d_out=2)
    model[0].weight.requires_grad_(False)
    x = torch.randn(4, 3)
    J = netsim.per_sample_grads(model, x)
    assert J.shape[2] == netsim.num_parameters(model) == sum(p.numel() for p in model.parameters()) - 24
    torch.testing.assert_close(J, reference_jacobians(model, x))


def test_chunking_does_not_change_the_result():
    model = mlp(d_out=2)
    x = torch.randn(11, 3)
    full = netsim.per_sample_grads(model, x, chunk_size=100)
    for chunk in (1, 4, 11):
        torch.testing.assert_close(netsim.per_sample_grads(model, x, chunk_size=chunk), full)
    starts = [s for s, _ in iter_jacobians(model, x, chunk_size=4)]
    assert starts == [0, 4, 8]


def test_one_dimensional_output_is_read_as_d_equal_one():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    assert output_dim(model, torch.randn(2, 3)) == 1
    assert netsim.per_sample_grads(model, torch.randn(2, 3)).shape == (2, 1, 21)


def test_no_trainable_parameter_is_an_error():
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        netsim.per_sample_grads(model, torch.randn(2, 3))


def test_empty_inputs_are_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        netsim.per_sample_grads(mlp(), torch.randn(0, 3))


def test_device_mismatch_is_an_error():
    with pytest.raises(ValueError, match="meta"):
        netsim.per_sample_grads(mlp(), torch.randn(2, 3, device="meta"))


def test_wrong_output_shape_is_an_error():
    model = nn.Conv2d(1, 2, 3)  # (B, 2, H, W): not a (B, d) output
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        netsim.per_sample_grads(model, torch.randn(2, 1, 5, 5))


def test_training_mode_batchnorm_is_an_error():
    with pytest.raises(ValueError, match="eval"):
        netsim.per_sample_grads(SmallCNN().train(), torch.randn(2, 1, 8, 8))


def test_targets_of_wrong_length_are_an_error():
    with pytest.raises(ValueError, match="one per sample"):
        netsim.per_sample_grads(mlp(d_out=3), torch.randn(4, 3), outputs.class_vs_rest,
                                targets=torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("d", [1, 3])
def test_prelu_after_convolution_matches_reference_loop(d):
    """Regression: vmap over a vmapped jacrev broke on PReLU after a convolution (torch 2.13)."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.PReLU(3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(27, d))
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(netsim.per_sample_grads(model, x), reference_jacobians(model, x), rtol=1e-5, atol=1e-6)


@dataclass
class _Output:
    """A structured model output, like a Hugging Face ModelOutput."""

    logits: torch.Tensor
    hidden: torch.Tensor


class _Structured(nn.Module):
    """The MLP returning a dict or a dataclass of (logits, hidden)."""

    def __init__(self, as_dict: bool):
        super().__init__()
        self.net, self.as_dict = mlp(d_out=2), as_dict

    def forward(self, x):
        logits = self.net(x)
        return {"logits": logits, "hidden": x} if self.as_dict else _Output(logits, x)


@pytest.mark.parametrize("as_dict", [True, False])
def test_output_fn_receives_dict_and_dataclass_outputs_unchanged(as_dict):
    model, x = _Structured(as_dict).eval(), torch.randn(6, 3)
    seen = []

    def logits(out):
        seen.append(type(out))
        return out["logits"] if as_dict else out.logits

    expected = netsim.similarity(model.net, x)
    for method in ("jacobian", "layerwise", "auto"):
        torch.testing.assert_close(netsim.similarity(model, x, output_fn=logits, method=method), expected)
        torch.testing.assert_close(netsim.soft_density(model, x, output_fn=logits, method=method), expected.sum(1))
    torch.testing.assert_close(netsim.per_sample_grads(model, x, output_fn=logits),
                               netsim.per_sample_grads(model.net, x))
    assert set(seen) == {dict if as_dict else _Output}
    with pytest.raises(TypeError, match="pass output_fn"):
        netsim.similarity(model, x)
