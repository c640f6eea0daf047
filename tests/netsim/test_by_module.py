"""netsim.similarity_by_module: the per-module parts add up to similarity, each part equals the plain
formula on the reference Jacobians cut into parameter blocks, and non-additive or bad calls are refused
before the model runs."""

import pytest
import torch
from torch import nn

import netsim
from conftest import (
    SmallCNN,
    TinyResNet,
    TinyTransformer,
    assert_model_unchanged,
    mlp,
    model_state,
    reference_jacobians,
    token_batch,
)

METHODS = ("jacobian", "layerwise")
KINDS = ("inner", "influence", "correlation")
REDUCTIONS = ("trace", "none")


def _mlp():
    return mlp(d_out=2, dtype=torch.float64)


def _cnn():
    return SmallCNN(d_out=2).double().eval()


def _log_softmax(out):         # singular self-kernels: rank K(x, x) = d - 1
    return torch.log_softmax(out, 1)


def _reference_parts(model, xs, ys, kind, reduce, output_fn=None):
    """{module: (N, M[, d, d])} by the plain formulas, per pair, on reference Jacobians cut into the
    columns of each module's parameters (named_parameters order)."""
    jx = reference_jacobians(model, xs, output_fn)
    jy = jx if ys is None else reference_jacobians(model, ys, output_fn)
    columns, offset = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            module = name.rpartition(".")[0]
            columns.setdefault(module, []).extend(range(offset, offset + p.numel()))
            offset += p.numel()

    def power(k, exponent):      # on the range of K: eigenvalues above 1e-10 * the largest
        evals, evecs = torch.linalg.eigh(k)
        keep = evals > 1e-10 * evals[-1]
        scaled = torch.where(keep, evals.clamp_min(1e-300) ** exponent, torch.zeros_like(evals))
        return evecs @ torch.diag(scaled) @ evecs.T, int(keep.sum())

    parts = {}
    for module, cols in columns.items():
        block = torch.zeros(len(jx), len(jy), *((jx.shape[1],) * 2 if reduce == "none" else ()), dtype=jx.dtype)
        for i, a in enumerate(jx):
            for j, b in enumerate(jy):
                k_m = a[:, cols] @ b[:, cols].T
                if kind == "inner":
                    m, n = k_m, a.shape[0]
                elif kind == "influence":          # K_m(y, x) K(x, x)^+
                    inv, n = power(a @ a.T, -1.0)
                    m = k_m.T @ inv
                else:
                    (left, rx), (right, ry) = power(a @ a.T, -0.5), power(b @ b.T, -0.5)
                    m, n = left @ k_m @ right, (rx * ry) ** 0.5
                block[i, j] = m if reduce == "none" else torch.trace(m) / n
        parts[module] = block
    return parts


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_parts_add_up_to_similarity(model, kind, reduce, method):
    net = model()
    xs = torch.randn(9, 3, dtype=torch.float64) if isinstance(net, nn.Sequential) else \
        torch.randn(9, 1, 8, 8, dtype=torch.float64)
    for ys in (None, xs[:5] + 0.3):
        # small blocks and chunks: several row blocks, mirrored blocks and short last chunks
        options = dict(kind=kind, reduce=reduce, method=method, chunk_size=2, memory_budget=2000)
        parts = netsim.similarity_by_module(net, xs, ys, **options)
        whole = netsim.similarity(net, xs, ys, **options)
        assert all(p.shape == whole.shape for p in parts.values())
        torch.testing.assert_close(sum(parts.values()), whole, rtol=0, atol=1e-10)


@pytest.mark.parametrize("reduce", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_parts_equal_the_plain_formula_on_split_reference_jacobians(model, kind, reduce):
    net = model()
    xs = torch.randn(5, 3, dtype=torch.float64) if isinstance(net, nn.Sequential) else \
        torch.randn(5, 1, 8, 8, dtype=torch.float64)
    ys = xs[:3] * 0.5 - 0.2
    output_fn = _log_softmax if kind != "inner" else None
    for second in (None, ys):
        expected = _reference_parts(net, xs, second, kind, reduce, output_fn)
        for method in METHODS:
            parts = netsim.similarity_by_module(net, xs, second, kind=kind, reduce=reduce, method=method,
                                                output_fn=output_fn, chunk_size=2)
            assert list(parts) == list(expected) == [n for n, m in net.named_modules() if m._parameters]
            for name in expected:
                torch.testing.assert_close(parts[name], expected[name], rtol=0, atol=1e-10)


def test_correlation_parts_share_out_the_unit_self_similarity_and_stay_in_bounds():
    parts = netsim.similarity_by_module(_cnn(), torch.randn(8, 1, 8, 8, dtype=torch.float64))
    total = sum(parts.values())
    torch.testing.assert_close(total.diagonal(), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert all(bool((p.abs() <= 1 + 1e-12).all()) for p in parts.values())
    assert all(bool((p.diagonal() >= 0).all()) for p in parts.values())   # Tr of a PSD block


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_transformer_and_resnet_parts_add_up(method):
    tokens = token_batch(6)
    net = TinyTransformer().double().eval()
    parts = netsim.similarity_by_module(net, tokens, method=method, chunk_size=4)
    torch.testing.assert_close(sum(parts.values()), netsim.similarity(net, tokens, method=method, chunk_size=4),
                               rtol=0, atol=1e-10)
    assert "encoder.layers.0.self_attn" in parts and "encoder.layers.0.self_attn.out_proj" in parts
    resnet = TinyResNet().double()
    xs = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    parts = netsim.similarity_by_module(resnet, xs, xs[:2] + 0.1, kind="influence", method=method)
    torch.testing.assert_close(sum(parts.values()), netsim.similarity(resnet, xs, xs[:2] + 0.1, kind="influence",
                                                                      method=method), rtol=0, atol=1e-10)
    assert list(parts)[0] == "stem.0" and list(parts)[-1] == "head"


def test_frozen_module_is_absent_and_the_rest_still_adds_up():
    net = _mlp()
    net[2].requires_grad_(False)
    xs = torch.randn(6, 3, dtype=torch.float64)
    for method in METHODS:
        parts = netsim.similarity_by_module(net, xs, method=method)
        assert list(parts) == ["0", "4"]
        torch.testing.assert_close(sum(parts.values()), netsim.similarity(net, xs, method=method), rtol=0, atol=1e-10)


def test_partly_frozen_module_keeps_its_trainable_parameters():
    net = _mlp()
    net[0].bias.requires_grad_(False)
    xs = torch.randn(4, 3, dtype=torch.float64)
    expected = _reference_parts(net, xs, None, "inner", "trace")
    for method in METHODS:
        parts = netsim.similarity_by_module(net, xs, kind="inner", method=method)
        for name in expected:
            torch.testing.assert_close(parts[name], expected[name], rtol=0, atol=1e-10)


def test_parameters_of_the_model_itself_and_tied_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))
            self.a = nn.Linear(3, 3).double()
            self.b = nn.Linear(3, 3).double()
            self.b.weight = self.a.weight       # tied: counts for `a`, listed first

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))) * self.scale

    net, xs = Tied(), torch.randn(5, 3, dtype=torch.float64)
    parts = netsim.similarity_by_module(net, xs)           # auto falls back to the Jacobian engine
    assert list(parts) == ["", "a", "b"]
    torch.testing.assert_close(sum(parts.values()), netsim.similarity(net, xs), rtol=0, atol=1e-10)
    expected = _reference_parts(net, xs, None, "correlation", "trace")
    for name in expected:
        torch.testing.assert_close(parts[name], expected[name], rtol=0, atol=1e-10)


def test_n_by_m_with_targets():
    net = mlp(d_out=3, dtype=torch.float64)
    xs, ys = torch.randn(7, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    labels_x, labels_y = torch.randint(0, 3, (7,)), torch.randint(0, 3, (4,))

    def nll(out, t):
        return -torch.log_softmax(out, 1).gather(1, t[:, None])

    for method in METHODS:
        options = dict(output_fn=nll, x_targets=labels_x, y_targets=labels_y, method=method)
        parts = netsim.similarity_by_module(net, xs, ys, **options)
        assert all(p.shape == (7, 4) for p in parts.values())
        torch.testing.assert_close(sum(parts.values()), netsim.similarity(net, xs, ys, **options), rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_rot_is_refused_as_not_additive_before_the_model_runs(kind):
    net = _mlp()
    before = model_state(net)
    with pytest.raises(ValueError, match="not linear"):
        netsim.similarity_by_module(net, torch.randn(4, 3, dtype=torch.float64), kind=kind, reduce="rot")
    assert_model_unchanged(net, before)


@pytest.mark.parametrize("bad, error, match", [
    (dict(kind="cosine"), ValueError, "must be one of"),
    (dict(reduce="max"), ValueError, "must be one of"),
    (dict(on_zero="nan"), ValueError, "must be one of"),
    (dict(method="fast"), ValueError, "must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(x_targets=torch.zeros(3)), ValueError, "x_targets has 3 rows"),
    (dict(y_targets=torch.zeros(4)), ValueError, "y_targets was given without ys"),
])
def test_bad_arguments_are_refused_before_the_model_runs(bad, error, match):
    net = _cnn()
    before = model_state(net)
    with pytest.raises(error, match=match):
        netsim.similarity_by_module(net, torch.randn(4, 1, 8, 8, dtype=torch.float64), **bad)
    assert_model_unchanged(net, before)


def test_batchnorm_in_training_mode_is_refused_and_left_untouched():
    net = SmallCNN(d_out=2).double().train()
    before = model_state(net)
    with pytest.raises(ValueError, match="training mode"):
        netsim.similarity_by_module(net, torch.randn(4, 1, 8, 8, dtype=torch.float64))
    assert_model_unchanged(net, before)


def test_zero_gradients_raise_as_in_similarity_and_opt_in_gives_zero_parts():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():          # no output bias: the input (-1, -1) switches every unit off
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.fill_(1.0)
    xs = torch.tensor([[1.0, 2.0], [-1.0, -1.0], [0.5, 0.1]], dtype=torch.float64)
    with pytest.raises(netsim.ZeroGradientError):
        netsim.similarity_by_module(net, xs)
    parts = netsim.similarity_by_module(net, xs, on_zero="zero")
    assert all(bool((p[1] == 0).all() and (p[:, 1] == 0).all()) for p in parts.values())
    torch.testing.assert_close(sum(parts.values()), netsim.similarity(net, xs, on_zero="zero"), rtol=0, atol=1e-10)


# --- data forms and parameter selection: as in similarity -----------------------------------

def _nll(out, t):
    return -torch.log_softmax(out, 1).gather(1, t[:, None])


@pytest.mark.parametrize("method", METHODS)
def test_loader_dataset_and_generator_give_the_tensor_result(method):
    from torch.utils.data import DataLoader, TensorDataset

    net = mlp(d_out=3, dtype=torch.float64)
    xs, labels = torch.randn(11, 3, dtype=torch.float64), torch.randint(0, 3, (11,))
    options = dict(output_fn=_nll, method=method, chunk_size=4, memory_budget=3000)
    expected = netsim.similarity_by_module(net, xs, x_targets=labels, **options)
    dataset = TensorDataset(xs, labels)
    for data in (DataLoader(dataset, batch_size=3), dataset, [(xs[i:i + 5], labels[i:i + 5]) for i in range(0, 11, 5)]):
        parts = netsim.similarity_by_module(net, data, **options)
        assert list(parts) == list(expected)
        for name in expected:
            torch.testing.assert_close(parts[name], expected[name], rtol=0, atol=1e-12)
    # a generator (one pass, length unknown until read) as the rows of an N x M call: xs is read once
    ys = torch.randn(4, 3, dtype=torch.float64)
    parts = netsim.similarity_by_module(net, (b for b in [(xs[:6], labels[:6]), (xs[6:], labels[6:])]), ys,
                                        y_targets=labels[:4], kind="influence", **options)
    whole = netsim.similarity(net, xs, ys, x_targets=labels, y_targets=labels[:4], kind="influence", **options)
    torch.testing.assert_close(sum(parts.values()), whole, rtol=0, atol=1e-10)


def test_dict_batches_are_keyword_inputs():
    tokens, mask = token_batch(5, padded=True)
    net = TinyTransformer().double().eval()
    data = [{"tokens": tokens[:3], "padding_mask": mask[:3]}, {"tokens": tokens[3:], "padding_mask": mask[3:]}]
    parts = netsim.similarity_by_module(net, data)
    torch.testing.assert_close(sum(parts.values()), netsim.similarity(net, data), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_params_selects_the_modules_and_equals_freezing_the_others(method):
    net, xs = _cnn(), torch.randn(6, 1, 8, 8, dtype=torch.float64)
    parts = netsim.similarity_by_module(net, xs, params=["head.*", "conv.weight"], method=method)
    assert list(parts) == ["conv", "head"]
    torch.testing.assert_close(sum(parts.values()), netsim.similarity(net, xs, params=["head.*", "conv.weight"],
                                                                      method=method), rtol=0, atol=1e-10)
    frozen = _cnn()
    frozen.bn.requires_grad_(False)
    frozen.conv.bias.requires_grad_(False)
    expected = netsim.similarity_by_module(frozen, xs, method=method)
    for name in expected:
        torch.testing.assert_close(parts[name], expected[name], rtol=0, atol=1e-12)


def test_a_layerwise_factor_of_several_modules_is_a_clear_error():
    from netsim.by_module import layerwise_layout
    from netsim.layerwise import DenseFactors

    factors = [DenseFactors(torch.zeros(1, 1, 2), ("a.weight",)), DenseFactors(torch.zeros(1, 1, 2), ("b.w", "c.w"))]
    with pytest.raises(ValueError, match="several modules"):
        layerwise_layout(factors)
    assert layerwise_layout(factors[:1] * 2) == {"a": [0, 1]}
