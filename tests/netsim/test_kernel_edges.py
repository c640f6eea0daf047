"""netsim.kernel at the edges of real models and data: non-finite values, the scale of the
outputs, exact edge values, frozen and tied parameters, dict outputs, short last chunks, N = 1."""

import pytest
import torch
from torch import nn

import netsim
from conftest import SmallCNN, jacobian_grads, mlp, reference_jacobians
from netsim import NonFiniteError, ZeroGradientError

METHODS = ("jacobian", "layerwise")


# --- non-finite values: their own error, whatever on_zero says ------------------------------

def _with_nan(n=6, row=4):
    x = torch.randn(n, 3)
    x[row, 1] = float("nan")
    return x


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("on_zero", ["raise", "zero"])
@pytest.mark.parametrize("kind", ["correlation", "inner", "influence"])
def test_a_nan_input_is_named_as_a_non_finite_input(method, on_zero, kind):
    with pytest.raises(NonFiniteError, match="inputs of 1 sample") as err:
        netsim.similarity(mlp(d_out=2), _with_nan(), kind=kind, on_zero=on_zero, method=method, chunk_size=2)
    assert err.value.where == {"inputs": [4]} and err.value.indices == [4]
    assert not isinstance(err.value, ZeroGradientError)


@pytest.mark.parametrize("method", METHODS)
def test_nan_rows_of_a_second_set_and_of_the_soft_density_are_named(method):
    ys = _with_nan(8, row=7)
    with pytest.raises(NonFiniteError) as err:
        netsim.similarity(mlp(), torch.randn(5, 3), ys, method=method, chunk_size=3, on_zero="zero")
    assert err.value.indices == [7]
    with pytest.raises(NonFiniteError) as err:
        netsim.soft_density(mlp(), _with_nan(9, row=6), method=method, chunk_size=4, on_zero="zero")
    assert err.value.indices == [6]


def test_non_finite_outputs_and_gradients_are_told_apart():
    class Sqrt(nn.Module):        # sqrt(w x) at x = 0: the output is 0, its gradient 0/0
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.sqrt(self.w * x)

    with pytest.raises(NonFiniteError) as err:
        netsim.similarity(Sqrt(), torch.tensor([[1.0], [0.0], [4.0]]), method="jacobian")
    assert err.value.where == {"gradients": [1]}
    linear = nn.Linear(1, 1)
    with torch.no_grad():
        linear.weight.fill_(1.0)
        linear.bias.zero_()
    for method in METHODS:     # the square root of a negative output is NaN at sample 1 only
        with pytest.raises(NonFiniteError) as err:
            netsim.similarity(linear, torch.tensor([[1.0], [-1.0], [2.0]]), output_fn=torch.sqrt, method=method)
        assert err.value.where == {"outputs": [1]}


# --- the scale of the outputs -----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e-20, 1e-12, 1e12, 1e20])
def test_normalised_kernels_do_not_depend_on_the_scale_of_the_outputs(method, scale):
    """k^C and k^N are invariant to output scaling; in float32 the self-kernels J J^T of outputs
    scaled by 1e+-20 would overflow or underflow if computed as they are."""
    model, xs = mlp(d_out=2, seed=3), torch.randn(12, 3)

    def scaled(out):
        return out * scale

    for kind, reduce in (("correlation", "trace"), ("correlation", "none"), ("influence", "trace"),
                         ("correlation", "rot")):
        plain = netsim.similarity(model, xs, kind=kind, reduce=reduce, method=method)
        got = netsim.similarity(model, xs, kind=kind, reduce=reduce, method=method, output_fn=scaled, chunk_size=5)
        torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(netsim.soft_density(model, xs, output_fn=scaled, method=method),
                               netsim.soft_density(model, xs, method=method), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(netsim.soft_density(model, xs[:4], reference=xs, output_fn=scaled, method=method),
                               netsim.soft_density(model, xs[:4], reference=xs, method=method), rtol=1e-5, atol=1e-5)


def test_the_scale_of_one_sample_does_not_change_its_correlations():
    """A per-sample scale (huge for some samples only) leaves k^C unchanged too."""
    model, xs = mlp(d_out=1, seed=5), torch.randn(8, 3)
    weights = torch.tensor([1.0, 1e25, 1.0, 1e-25, 1.0, 1.0, 1e20, 1.0])[:, None]
    plain = netsim.similarity(model, xs)
    J = jacobian_grads(model, xs) * weights[:, :, None]
    torch.testing.assert_close(netsim.similarity_from_jacobians(J), plain, rtol=1e-5, atol=1e-5)


# --- exact edge values ----------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduce,d", [("trace", 1), ("trace", 3), ("rot", 2)])
def test_self_similarity_is_exactly_one_and_every_value_within_one(method, reduce, d):
    model = mlp(d_out=d, seed=7, hidden=16)
    xs = torch.randn(40, 3)
    xs[20:30] = xs[:10]                        # duplicates: cosine 1 up to rounding
    k = netsim.similarity(model, xs, reduce=reduce, method=method, chunk_size=7, memory_budget=2**14)
    assert bool((k.diagonal() == 1).all())
    assert k.abs().max() <= 1
    torch.testing.assert_close(k[20:30, :10].diagonal(), torch.ones(10), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_full_rank_self_blocks_are_exactly_the_identity(method):
    k = netsim.similarity(mlp(d_out=3, seed=8), torch.randn(10, 3), reduce="none", method=method, chunk_size=4)
    assert bool((k[torch.arange(10), torch.arange(10)] == torch.eye(3)).all())


def test_rank_deficient_self_blocks_are_the_projector_on_the_range():
    model = mlp(d_out=4, seed=9)
    xs = torch.randn(5, 3)
    k = netsim.similarity(model, xs, reduce="none", output_fn=netsim.outputs.neg_log_softmax)
    p = k[torch.arange(5), torch.arange(5)]
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-5)                   # a projector
    torch.testing.assert_close(p.diagonal(dim1=-2, dim2=-1).sum(-1), torch.full((5,), 3.0), rtol=0, atol=1e-5)


def test_dense_path_from_jacobians_has_the_same_exact_edges():
    J = torch.randn(7, 2, 30)
    J[3] = J[1] * 4
    k = netsim.similarity_from_jacobians(J)
    assert bool((k.diagonal() == 1).all()) and k.abs().max() <= 1
    with pytest.raises(NonFiniteError):
        netsim.similarity_from_jacobians(torch.full((2, 1, 3), float("inf")))


# --- what real models look like ---------------------------------------------------------------

def _reference_similarity(model, xs, **kw):
    return netsim.similarity_from_jacobians(reference_jacobians(model, xs, **kw))


@pytest.mark.parametrize("method", METHODS)
def test_frozen_backbone_uses_the_trainable_parameters_only(method):
    model = mlp(d_out=2, seed=10)
    model[0].requires_grad_(False)
    xs = torch.randn(9, 3)
    torch.testing.assert_close(netsim.similarity(model, xs, method=method), _reference_similarity(model, xs),
                               rtol=1e-5, atol=1e-5)


class _Tied(nn.Module):
    """One Linear used twice (weight tying): the gradient sums both uses."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(11)
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_weight_tying_falls_back_to_exact_jacobians():
    model, xs = _Tied(), torch.randn(7, 4)
    assert netsim.engine.engine_for(model, xs).name == "jacobian"
    torch.testing.assert_close(netsim.similarity(model, xs), _reference_similarity(model, xs), rtol=1e-5, atol=1e-5)
    with pytest.raises(netsim.layerwise.UnsupportedModel):
        netsim.similarity(model, xs, method="layerwise")


class _DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = mlp(d_out=3, seed=12)

    def forward(self, x):
        return {"logits": self.body(x), "features": x}


def test_dict_outputs_with_an_output_fn():
    xs = torch.randn(6, 3)
    k = netsim.similarity(_DictNet(), xs, output_fn=lambda out: out["logits"])
    torch.testing.assert_close(k, netsim.similarity(_DictNet().body, xs))
    with pytest.raises(TypeError, match="returned a dict.*output_fn"):
        netsim.similarity(_DictNet(), xs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,chunk", [(10, 3), (7, 7), (8, 64), (5, 1)])
def test_a_short_last_chunk_changes_nothing(method, n, chunk):
    model, xs, ys = SmallCNN(d_out=2).eval(), torch.randn(n, 1, 8, 8), torch.randn(4, 1, 8, 8)
    full = _reference_similarity(model, torch.cat([xs, ys]))
    torch.testing.assert_close(netsim.similarity(model, xs, method=method, chunk_size=chunk), full[:n, :n],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(netsim.similarity(model, xs, ys, method=method, chunk_size=chunk), full[:n, n:],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_single_sample(method):
    model, x = mlp(d_out=2), torch.randn(1, 3)
    assert netsim.similarity(model, x, method=method).tolist() == [[1.0]]
    torch.testing.assert_close(netsim.soft_density(model, x, method=method), torch.ones(1))
    assert netsim.neighbour_counts(model, x, method=method).tolist() == [0.0]
    assert netsim.similarity(model, x, reduce="none", method=method).shape == (1, 1, 2, 2)


def test_integer_inputs_reach_an_embedding():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1))
    tokens = torch.randint(0, 10, (5, 2))
    torch.testing.assert_close(netsim.similarity(model, tokens), _reference_similarity(model, tokens),
                               rtol=1e-5, atol=1e-5)
