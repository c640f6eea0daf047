"""The layer-wise rules of netsim.layerwise for Embedding, the norms, Conv1d, Linear over tokens and self-attention,
each against the per-sample reference loop in float64; whole models (a small transformer text classifier, a
ResNet-style CNN in eval mode); recurrent models through the Jacobian engine."""

import copy

import pytest
import torch
from torch import nn

import netsim
from conftest import TinyResNet, TinyTransformer, assert_model_unchanged, model_state, reference_jacobians, token_batch
from netsim import layerwise

D = torch.float64


class _Tokens(nn.Module):
    """Embedding (with a padding row) -> a layer on (n, T, E) tokens -> flatten -> Linear."""

    def __init__(self, layer, length=5, width=6):
        super().__init__()
        self.embed, self.layer = nn.Embedding(11, width, padding_idx=0), layer
        self.head = nn.Linear(length * width, 3)

    def forward(self, tokens):
        h = self.layer(self.embed(tokens))
        return self.head((h[0] if isinstance(h, tuple) else h).flatten(1))


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention as self-attention, the key padding mask read from the tokens (token 0 = padding)."""

    def __init__(self, batch_first, masked, attn_mask=None):
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 2, batch_first=batch_first)
        self.batch_first, self.masked, self.attn_mask = batch_first, masked, attn_mask
        self.pad = None

    def forward(self, h):
        x = h if self.batch_first else h.transpose(0, 1)
        out, _ = self.mha(x, x, x, key_padding_mask=self.pad if self.masked else None, attn_mask=self.attn_mask)
        return out if self.batch_first else out.transpose(0, 1)


class _Padded(nn.Module):
    """A token model whose padding mask is read from the tokens (token 0 = padding), so that the reference loop,
    which slices one input tensor, sees each sample's own mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, tokens):
        pad = tokens == 0
        for m in self.inner.modules():
            if isinstance(m, _SelfAttention):
                m.pad = pad
        return self.inner(tokens, pad) if isinstance(self.inner, TinyTransformer) else self.inner(tokens)


def _padded_tokens(n=6, length=5, vocab=11):
    tokens, pad = token_batch(n, length, vocab, padded=True, seed=3)
    return tokens.clamp_min(1).masked_fill(pad, 0)


def _weighted(norm):
    """A norm whose weight is not all ones (its initial value), so that the rule's form check has work to do."""
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


class GemmaRMSNorm(nn.Module):
    """Gemma's RMS norm, x_hat * (1 + weight): named like an RMS norm, but not of the form x_hat * weight."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def _batchnorm_eval(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _cases():
    torch.manual_seed(0)
    conv1d = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.BatchNorm1d(3), nn.Tanh(),
                           nn.Conv1d(3, 4, 2, dilation=2, bias=False), nn.GroupNorm(2, 4), nn.Flatten(),
                           nn.Linear(4 * 2, 2))
    norms2d = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 2), nn.GroupNorm(2, 4),
                            nn.Flatten(), nn.LayerNorm(4 * 3 * 3), nn.Linear(4 * 3 * 3, 2))
    flat = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    tokens, padded = token_batch(6, 5, 11, seed=2), _padded_tokens()
    return {
        "embedding+linear over tokens": (_Tokens(nn.Linear(6, 6)), tokens),
        "layernorm over tokens": (_Tokens(nn.LayerNorm(6)), tokens),
        "rmsnorm over tokens": (_Tokens(_weighted(nn.RMSNorm(6))), tokens),
        "conv1d+batchnorm1d+groupnorm": (_batchnorm_eval(conv1d), torch.randn(5, 2, 8)),
        "batchnorm2d+groupnorm+layernorm": (_batchnorm_eval(norms2d), torch.randn(5, 1, 6, 6)),
        "batchnorm1d on features": (_batchnorm_eval(flat), torch.randn(5, 3)),
        "attention batch_first": (_Tokens(_SelfAttention(True, False)), tokens),
        "attention sequence first": (_Tokens(_SelfAttention(False, False)), tokens),
        "attention with key padding mask": (_Padded(_Tokens(_SelfAttention(True, True))), padded),
        "attention with causal mask": (_Tokens(_SelfAttention(True, False, attn_mask=causal)), tokens),
        "encoder layer": (_Tokens(nn.TransformerEncoderLayer(6, 2, 12, dropout=0.0, batch_first=True)).eval(),
                          tokens),
        "tiny transformer": (TinyTransformer().eval(), token_batch(5)),
        "tiny transformer padded": (_Padded(TinyTransformer()).eval(), _padded_tokens(5, 6, 50)),
        "tiny resnet": (TinyResNet(), torch.randn(4, 1, 8, 8)),
    }


@pytest.fixture
def no_generic_rule(monkeypatch):
    """Fails a test that falls back to the generic rule (every module of these models has its own rule)."""
    def refuse(module, *args):
        raise AssertionError(f"{type(module).__name__} went through the generic rule")
    monkeypatch.setattr(layerwise, "_generic_rule", refuse)


@pytest.mark.parametrize("name", list(_cases()))
def test_each_rule_equals_the_reference_loop_in_float64(name, no_generic_rule):
    model, xs = _cases()[name]
    model = model.to(D)
    xs = xs.to(D) if xs.is_floating_point() else xs
    before = model_state(model)
    factors = layerwise.factorise(model, xs)
    J = reference_jacobians(model, xs)
    torch.testing.assert_close(layerwise.materialise(factors), J, rtol=1e-10, atol=1e-12)
    names = [n for f in factors for n in f.names]
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert_model_unchanged(model, before)
    assert not any("forward" in vars(m) for m in model.modules())       # the recording forward is gone


def test_an_rms_norm_of_another_form_goes_to_the_generic_rule_in_every_chunk():
    """The RMS rule checks a module's form on its first chunk only: a module that fails it (Gemma's
    x_hat * (1 + weight)) is never remembered as checked, so every chunk takes the generic rule."""
    torch.manual_seed(0)
    model, xs = _Tokens(GemmaRMSNorm(6)).to(D), token_batch(6, 5, 11, seed=2)
    reference = netsim.similarity_from_jacobians(reference_jacobians(model, xs))
    for _ in range(2):
        torch.testing.assert_close(netsim.similarity(model, xs, method="layerwise", chunk_size=2), reference,
                                   rtol=1e-9, atol=1e-10)
    assert model.layer not in layerwise._RMS_FORM_CHECKED


@pytest.mark.parametrize("name", ["tiny transformer padded", "tiny resnet"])
def test_whole_models_give_the_reference_kernels_with_both_engines(name):
    model, xs = _cases()[name]
    model = model.to(D)
    xs = xs.to(D) if xs.is_floating_point() else xs
    reference = netsim.similarity_from_jacobians(reference_jacobians(model, xs))
    for method in ("layerwise", "jacobian", "auto"):
        torch.testing.assert_close(netsim.similarity(model, xs, method=method), reference, rtol=1e-9, atol=1e-10)


def test_padding_changes_the_kernel():
    """The key padding mask is honoured: masking the padded tokens out is not the same as attending to them."""
    model = TinyTransformer().to(D).eval()
    tokens = _padded_tokens(5, 6, 50)
    masked = netsim.similarity(_Padded(model), tokens, method="layerwise")
    plain = netsim.similarity(model, tokens, method="layerwise")
    assert (masked - plain).abs().max() > 1e-3


def test_frozen_attention_weights_leave_the_other_projection():
    model = TinyTransformer().to(D).eval()
    attention = model.encoder.layers[0].self_attn
    attention.in_proj_weight.requires_grad_(False)
    attention.out_proj.bias.requires_grad_(False)
    xs = token_batch(4)
    factors = layerwise.factorise(model, xs)
    names = [n for f in factors for n in f.names]
    assert "encoder.layers.0.self_attn.in_proj_bias" in names
    assert "encoder.layers.0.self_attn.in_proj_weight" not in names
    torch.testing.assert_close(layerwise.materialise(factors), reference_jacobians(model, xs), rtol=1e-10, atol=1e-12)


def test_cross_attention_is_left_to_the_jacobian_engine():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x.flip(1), x.flip(1))[0].sum(1)

    model, xs = Cross(), torch.randn(3, 5, 4)
    with pytest.raises(layerwise.UnsupportedModel, match="self-attention"):
        layerwise.factorise(model, xs)
    assert not any("forward" in vars(m) for m in model.modules())
    assert netsim.engine.engine_for(model, xs).name == "jacobian"


class _PositionIds(nn.Module):
    """Position embeddings looked up without a batch dimension, as in nanoGPT: pos(arange(T)) is `(T, dim)`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos, self.head = nn.Embedding(20, 8), nn.Embedding(6, 8), nn.Linear(8, 2)

    def forward(self, tokens):
        return self.head((self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))).mean(1))


@pytest.mark.parametrize("model", [_PositionIds(), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0).eval()],
                         ids=["position_ids", "sequence_first"])
def test_modules_called_without_the_batch_first_go_to_the_jacobian_engine(model):
    """The rules read dimension 0 as the sample; a module that sees another layout is named, and auto is exact."""
    xs = token_batch(5, 4, 20) if isinstance(model, _PositionIds) else torch.randn(5, 3, 8)

    def first_two(out):
        return out.reshape(out.shape[0], -1)[:, :2]

    with pytest.raises(layerwise.UnsupportedModel, match="first dimension is not the 1 sample"):
        netsim.engine.engine_for(model, xs, first_two, method="layerwise")
    assert netsim.engine.engine_for(model, xs, first_two).name == "jacobian"
    reference = reference_jacobians(copy.deepcopy(model).double(), xs if xs.dtype == torch.long else xs.double(),
                                    first_two)
    torch.testing.assert_close(netsim.similarity(model, xs, output_fn=first_two),
                               netsim.similarity_from_jacobians(reference).float(), rtol=1e-4, atol=1e-5)


class _LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.lstm, self.head = nn.Embedding(20, 4), nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0][:, -1])


def test_an_lstm_goes_through_the_jacobian_engine_and_layerwise_names_it():
    """In float32: vmap over a float64 LSTM fails inside torch 2.13 (`_VF.lstm`: "output with shape [1, 20] doesn't
    match the broadcast shape"); the reference loop runs in float64."""
    model, xs = _LSTMClassifier(), token_batch(5, 4, 20)
    assert netsim.engine.engine_for(model, xs).name == "jacobian"
    with pytest.raises(layerwise.UnsupportedModel, match="LSTM 'lstm'"):
        netsim.similarity(model, xs, method="layerwise")
    reference = netsim.similarity_from_jacobians(reference_jacobians(_LSTMClassifier().to(D), xs))
    torch.testing.assert_close(netsim.similarity(model, xs).to(D), reference, rtol=1e-4, atol=1e-5)


def test_unfused_attention_lets_forward_mode_through_an_encoder_in_eval_mode():
    """PyTorch's fused encoder kernel has no forward-mode rule; inside `unfused_attention` jvp works, equals
    J v from the reference Jacobians, and the fast-path setting is restored (also after an error)."""
    model, xs = TinyTransformer().to(D).eval(), token_batch(4)
    tangent = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with layerwise.unfused_attention():
        assert not torch.backends.mha.get_fastpath_enabled()
        jv = netsim.output_jvp(model, xs, tangent)
    assert torch.backends.mha.get_fastpath_enabled()
    v = torch.cat([tangent[n].flatten() for n, _ in model.named_parameters()])
    torch.testing.assert_close(jv, reference_jacobians(model, xs) @ v, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="inside"), layerwise.unfused_attention():
        raise RuntimeError("inside")
    assert torch.backends.mha.get_fastpath_enabled()


def test_soft_density_and_similarity_work_on_a_transformer_in_eval_mode():
    """Without `unfused_attention` around its jvp, soft_density failed here: forward AD through the fused encoder."""
    model, xs = TinyTransformer().eval(), token_batch(12)
    kc = netsim.similarity(model, xs, method="layerwise")
    dense = netsim.similarity(model, xs, method="jacobian")
    torch.testing.assert_close(kc, dense, rtol=1e-4, atol=1e-5)
    for cache in (None, 0):   # kept Jacobians, and the jvp second pass
        torch.testing.assert_close(netsim.soft_density(model, xs, memory_budget=cache), kc.sum(1),
                                   rtol=1e-4, atol=1e-4)
