"""netsim.grads at the edges: tied and frozen parameters, dict outputs, integer inputs, short
chunks, N = 1, non-finite Jacobians named by position, forward-mode products checked."""

import pytest
import torch
from torch import nn

import netsim
from conftest import mlp, reference_jacobians
from netsim import NonFiniteError


class _TiedAutoencoder(nn.Module):
    """Decoder weight = encoder weight transposed (weight tying): one parameter, two uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(41)
        self.enc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(self.enc(x)) @ self.enc.weight


def test_tied_weights_sum_both_uses():
    model, xs = _TiedAutoencoder(), torch.randn(5, 4)
    torch.testing.assert_close(netsim.per_sample_grads(model, xs, chunk_size=2), reference_jacobians(model, xs))


@pytest.mark.parametrize("n,chunk", [(1, None), (7, 3), (4, 4), (3, 100)])
def test_chunk_boundaries_and_single_samples(n, chunk):
    model, xs = mlp(d_out=2, seed=42), torch.randn(n, 3)
    torch.testing.assert_close(netsim.per_sample_grads(model, xs, chunk_size=chunk), reference_jacobians(model, xs))
    starts = [s for s, _ in netsim.iter_jacobians(model, xs, chunk_size=chunk)]
    assert starts == list(range(0, n, chunk or netsim.grads.DEFAULT_CHUNK))


def test_a_frozen_backbone_leaves_its_parameters_out():
    model = mlp(d_out=1, seed=43)
    model[0].requires_grad_(False)
    model[2].requires_grad_(False)
    J = netsim.per_sample_grads(model, torch.randn(3, 3))
    assert J.shape == (3, 1, netsim.num_parameters(model)) and netsim.num_parameters(model) == 9


def test_nan_inputs_are_named_by_their_position_in_the_data():
    xs = torch.randn(10, 3)
    xs[[2, 8], 0] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        netsim.per_sample_grads(mlp(), xs, chunk_size=4)
    assert err.value.where == {"inputs": [2]}     # raised with the first chunk that holds one


def test_output_jvp_equals_the_jacobian_times_the_direction_and_checks_it():
    model, xs = mlp(d_out=2, seed=44), torch.randn(6, 3)
    tangent = {k: torch.randn_like(p) for k, p in netsim.trainable_parameters(model).items()}
    v = torch.cat([t.flatten() for t in tangent.values()])
    torch.testing.assert_close(netsim.output_jvp(model, xs, tangent), reference_jacobians(model, xs) @ v,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tangent"):
        netsim.output_jvp(model, xs, {**tangent, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="tangent"):
        netsim.output_jvp(model, xs, {k: t.double() for k, t in tangent.items()})
    bad = torch.randn(6, 3)
    bad[3] = float("nan")
    with pytest.raises(NonFiniteError) as err:
        netsim.output_jvp(model, bad, tangent)
    assert err.value.where == {"inputs": [3]}


def test_output_fn_returning_the_wrong_shape_is_a_clear_error():
    with pytest.raises(TypeError, match="returned a list"):
        netsim.per_sample_grads(mlp(), torch.randn(2, 3), output_fn=lambda out: [out])
    with pytest.raises(ValueError, match="d = 0"):
        netsim.per_sample_grads(mlp(), torch.randn(2, 3), output_fn=lambda out: out[:, :0])
