"""Per-layer structure of per-sample gradients: kernels without p-long gradient vectors.

For a module with parameters, the gradient of output a at sample x w.r.t. its parameters is
fixed by the module's input X(x) and the gradient of output a w.r.t. the module's output,
Delta^a(x). One batched forward (hooks record X) and d batched backward passes (gradients of
sum_x f^a(x) w.r.t. each module output; samples do not interact) give both for a whole chunk.
Per-layer rules then turn them into kernel blocks. The supported layer types, and what each
rule stores:

- Linear on `(n, in)` inputs: grad_W = Delta^T X, grad_b = Delta. Kept as the factors
  ("linear" entries, `LinearFactors`: X `(n, in)`, Delta `(n, d, out)`): the gram between
  samples is (Delta_x . Delta_y) * (X_x . X_y + 1), O(n m (in + out)) instead of
  O(n m in out). Tiny layers (e.g. 2 inputs or 1 output) are materialised instead, as their
  factored grams would starve the GEMMs.
- Linear on `(n, *positions, in)` inputs (tokens), Hugging Face's `Conv1D`: the weight is shared by
  the positions, the per-sample gradient is sum_t Delta_t^T X_t, materialised ("dense" entries,
  `DenseFactors`: `(n, d, out in + out)`) by one einsum. A factored form would cost
  O(n m T^2 (in + d out)) per gram block against O(n m d out in): cheaper only for few tokens and
  wide layers. With `tokens=True` these maps (and embeddings) stay as their per-token factors
  (`TokenFactors`), which the sketches of `netsim.sketch` project token by token.
- Conv1d / Conv2d (groups = 1, zero padding): per-sample gradients by `unfold`,
  Delta (out, P) @ U(P, in k)^T ("dense").
- Embedding (no `max_norm`): the per-sample gradient adds Delta_t into the rows of the sample's
  tokens (`scatter_add`, "dense" `(n, d, vocab dim)`; the `padding_idx` row stays zero).
- LayerNorm, GroupNorm, BatchNorm1d/2d/3d in eval mode with running statistics: output =
  x_hat * weight + bias with x_hat the normalised input (recomputed from the recorded input;
  for BatchNorm from the running statistics), so grad_weight = sum over positions of
  x_hat * Delta and grad_bias = sum of Delta ("dense" `(n, d, 2 C)`).
- MultiheadAttention (self-attention, `query is key is value`, packed in_proj, no
  bias_k / bias_v / add_zero_attn; as inside `nn.TransformerEncoderLayer`, batch_first or not,
  with key padding and attention masks): while recording, the module runs a decomposed
  forward (in_proj -> scaled dot-product attention -> out_proj) that records the two linear
  maps' inputs and outputs; each is then a Linear over token positions (two "dense" entries:
  in_proj_weight/in_proj_bias, then out_proj.weight/out_proj.bias). The recording forward
  runs inside `unfused_attention`, so PyTorch's fused encoder kernel cannot bypass the hooks.
- Any other module with direct parameters (PReLU, Bilinear, ...): the generic rule --
  per-sample copies of its parameters, one vmapped forward of that module alone, one batched
  backward per output row with cotangent Delta ("dense").

Recurrent modules (LSTM, GRU) take or return several tensors: `factorise` refuses them,
naming the module, and `method="auto"` uses the Jacobian engine.

`factorise` refuses models whose structure breaks the rules (a module called twice, shared or
tied parameters, parameters used outside their module); callers then fall back to the
full-model Jacobians of `netsim.grads`. In-place operations on a layer's output (a convolution
followed by ReLU(inplace=True)) are handled by recording copies (`_record`); `without_inplace`
gives a copy of a model without in-place activation modules.

All rules give the same numbers as `per_sample_grads` (tested layer by layer); they only
avoid forming, storing and multiplying p-long vectors.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from .checks import as_output_matrix, check_batch, check_model, nonfinite_rows
from .data import Inputs, input_rows
from .grads import OutputFn, nonfinite_error, run_model, trainable_parameters, unfused_attention
from .params import ParamSpec
from .threads import model_lock


class UnsupportedModel(ValueError):
    """The model's structure does not allow the per-layer rules (use the Jacobian path)."""


@dataclass
class LinearFactors:
    """A Linear layer's per-sample gradients, factored: grad_W^a = delta[:, a]^T x, grad_b^a = delta[:, a].

    Attributes:
        x: `(n, in)` layer inputs.
        delta: `(n, d, out)` output gradients.
        bias: whether the layer has a (trainable) bias.
        weight: whether the weight is trainable.
    """

    x: Tensor
    delta: Tensor
    bias: bool
    weight: bool = True
    names: tuple = ()      # full parameter names (weight, bias), as in model.named_parameters()


@dataclass
class DenseFactors:
    """Materialised per-sample gradients of one module's parameters, `(n, d, p_layer)`,
    concatenated in the order of `names` (full parameter names)."""

    grads: Tensor
    names: tuple = ()


@dataclass
class TokenFactors:
    """A map shared by the token positions, its per-sample gradients kept as per-token factors
    (`factorise(..., tokens=True)`, for the sketches of `netsim.sketch`; `dense` forms them):

    - "linear" (weight `(out, in)`): grad_W^a = sum_t delta_t^a x_t^T, grad_b^a = sum_t delta_t^a;
    - "transposed" (weight `(in, out)`, Hugging Face's `Conv1D`): grad_W^a = sum_t x_t delta_t^a^T;
    - "embedding" (weight `(vocab, dim)`): grad_W^a = sum_t e_{id_t} delta_t^a^T, the rows of the
      looked-up ids (a padding row's deltas are already zero).

    Attributes:
        x: `(n, T, in)` inputs at each position, or `(n, T)` token ids (embedding).
        delta: `(n, d, T, out)` output gradients at each position.
        kind: "linear", "transposed" or "embedding".
        weight, bias: which parameters are selected (an embedding: the weight only).
        rows: an embedding's vocabulary size (its weight's first dimension).
        names: full parameter names (weight, bias).
    """

    x: Tensor
    delta: Tensor
    kind: str
    weight: bool = True
    bias: bool = False
    rows: int = 0
    names: tuple = ()

    def dense(self) -> DenseFactors:
        """The materialised `(n, d, p_layer)` per-sample gradients (weight, then bias)."""
        n, d, t, width = self.delta.shape
        if self.kind == "embedding":
            grads = self.delta.new_zeros(n, d, self.rows, width)
            grads.scatter_add_(2, self.x.reshape(n, 1, t, 1).expand(self.delta.shape), self.delta)
            return DenseFactors(grads.reshape(n, d, -1), self.names)
        parts = []
        if self.weight:
            pattern = "nato,nti->naio" if self.kind == "transposed" else "nato,nti->naoi"
            parts.append(torch.einsum(pattern, self.delta, self.x).reshape(n, d, -1))
        if self.bias:
            parts.append(self.delta.sum(2))
        return DenseFactors(torch.cat(parts, 2) if len(parts) > 1 else parts[0], self.names)

    def split(self) -> list[TokenFactors]:
        """One entry per selected parameter (weight, bias)."""
        if not (self.weight and self.bias):
            return [self]
        return [TokenFactors(self.x, self.delta, self.kind, True, False, self.rows, self.names[:1]),
                TokenFactors(self.x, self.delta, self.kind, False, True, self.rows, self.names[1:])]


@dataclass
class TokenSum:
    """A parameter used by several token modules (tied weights: GPT-2's `lm_head` and token
    embedding): its per-sample gradient is the sum of the `parts`' (`TokenFactors` of that
    parameter alone)."""

    parts: list
    names: tuple = ()

    def dense(self) -> DenseFactors:
        grads = self.parts[0].dense().grads.clone()
        for part in self.parts[1:]:
            grads += part.dense().grads
        return DenseFactors(grads, self.names)


def _param_modules(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, nn.Module, dict[str, Tensor]]]:
    """Modules owning trainable parameters directly, with those parameters; checks ownership.

    A composite module (`_COMPOSITES`: MultiheadAttention) owns its children's parameters too
    (`out_proj.weight`...), in `named_parameters` order, and its children are not owners. A
    parameter may have several owners (tied weights, e.g. GPT-2's `lm_head` and token embedding):
    its gradient is the sum of their entries (`_merge_tied`)."""
    selected = trainable_parameters(model, params)
    chosen = {id(p) for p in selected.values()}
    owners, seen, inside = [], {}, []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix) for prefix in inside):
            continue
        members = module.named_parameters(recurse=True) if type(module) in _COMPOSITES else module._parameters.items()
        direct = {k: p for k, p in members if p is not None and id(p) in chosen}
        if type(module) in _COMPOSITES:
            inside.append(f"{name}." if name else "")
        if not direct:
            continue
        if id(module) in seen:   # one module registered under two names: it would be recorded twice
            raise UnsupportedModel(f"module {name!r} is also registered as {seen[id(module)]!r}")
        seen[id(module)] = name
        owners.append((name, module, direct))
    total = sum(p.numel() for p in selected.values())
    owned = {id(p): p for _, _, d in owners for p in d.values()}
    if sum(p.numel() for p in owned.values()) != total:
        raise UnsupportedModel("some trainable parameters are not owned by a module")
    return owners


class InPlaceModified(UnsupportedModel):
    """A recorded module input or output was modified in place later in the forward pass
    (e.g. a Conv2d followed by ReLU(inplace=True)): record with copies (`copy=True`)."""


def _record(model: nn.Module, inputs: Inputs, owners, copy: bool | None) -> tuple[Tensor, list, bool]:
    """Forward pass recording each owner's (input, output); checks each runs exactly once.

    When a later operation modifies an owner's output or input in place (ReLU(inplace=True)
    after a convolution), the recorded tensor no longer holds the module's value. With
    `copy=True` each owner's output is passed on as a copy (the in-place operation modifies the
    copy, the original stays in the graph to differentiate against) and its input is recorded
    as a copy. `copy=None` tries without copies first and runs the forward again with them if
    needed. Returns (output, pairs, whether copies were used): callers that factorise many
    chunks (`engine.LayerwiseEngine`) keep that answer and pass it back.
    """
    out, pairs, modified = _forward_recording(model, inputs, owners, bool(copy))
    if modified is not None and copy is None:
        copy = True
        out, pairs, modified = _forward_recording(model, inputs, owners, True)
    if modified is not None:
        error = InPlaceModified if not copy else UnsupportedModel
        raise error(f"the input or output of {modified!r} is modified in place later in the forward pass")
    return out, pairs, bool(copy)


def without_inplace(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose activations and dropouts compute out of place.

    Modules with an `inplace` flag (ReLU, LeakyReLU, ELU, Hardtanh, Dropout...) overwrite their
    input, which forward hooks and some per-sample-gradient libraries cannot record. The copy
    computes the same function with the same parameters (copied, not shared: the original is
    untouched). In-place operations written in a `forward` (`x.relu_()`, `x += y`) are not
    modules and are left as they are; the layer-wise engine copes with those on its own.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(inplace=True))
        >>> without_inplace(net)[1].inplace, net[1].inplace
        (False, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = deepcopy(model)
    for module in out.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    return out


def _forward_recording(model: nn.Module, inputs: Inputs, owners, copy: bool):
    """One recorded forward: (output, [[(input, output), ...] per owner], name of the first
    owner whose recorded tensors were modified in place afterwards or None). Plain owners
    record one (input, output) pair by a forward hook; composite owners run their recording
    forward (`_COMPOSITES`), which records one pair per linear map."""
    records: dict[int, list] = {id(m): [] for _, m, _ in owners}
    names = {id(m): name for name, m, _ in owners}
    batch = input_rows(inputs)
    thread = threading.get_ident()   # a forward the user runs in another thread meanwhile is not ours

    def hook(module, args, output):
        if threading.get_ident() != thread:
            return None
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise UnsupportedModel(f"{type(module).__name__} {names[id(module)]!r} takes or returns more than one "
                                   "tensor: no layer-wise rule (method='jacobian' handles it)")
        x, broadcast = args[0], False
        if batch > 1 and x.ndim > 0 and x.shape[0] == 1 and output.ndim > 0 and output.shape[0] == 1:
            # One row shared by the batch (position ids `(1, T)` in Hugging Face models, added to
            # every sample's embeddings): expanded here, so each sample gets its own output row to
            # differentiate against, the same values, and the rest of the forward sees (batch, ...).
            x, output, broadcast = x.expand(batch, *x.shape[1:]), output.expand(batch, *output.shape[1:]), True
        call = []
        records[id(module)].append(call)
        replacement = _keep(call, x, output, copy)
        return output if replacement is None and broadcast else replacement

    handles, patched = [], {}
    for _, m, _ in owners:
        if type(m) in _COMPOSITES:
            patched[m] = m.__dict__.get("forward")   # an instance-level forward, if the user set one
            m.forward = _composite_forward(m, records[id(m)], copy, thread, patched[m])
        else:
            handles.append(m.register_forward_hook(hook))
    try:
        with unfused_attention():
            out = run_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
        for m, forward in patched.items():
            if forward is None:
                del m.forward  # the class's forward again
            else:
                m.forward = forward
    pairs, modified = [], None
    for name, m, _ in owners:
        if len(records[id(m)]) != 1:
            raise UnsupportedModel(f"module {name!r} ran {len(records[id(m)])} times in one forward pass")
        call = records[id(m)][0]
        for x, x_version, o, o_version in call:
            if x.shape[:1] != (batch,) or o.shape[:1] != (batch,):
                # The rules read dimension 0 as the sample: position ids without a batch dimension
                # (pos(arange(T))) or a sequence-first layout would mix the samples up.
                raise UnsupportedModel(f"{type(m).__name__} {name!r} records a tensor of shape {tuple(x.shape)} whose "
                                       f"first dimension is not the {batch} sample(s) of the batch: no layer-wise "
                                       "rule (method='jacobian' handles it)")
            if modified is None and (o._version != o_version or x._version != x_version):
                modified = name
        pairs.append([(x, o) for x, _, o, _ in call])
    return out, pairs, modified


def _keep(call: list, x: Tensor, output: Tensor, copy: bool) -> Tensor | None:
    """Records one linear map's (input, output) in `call`; returns what the rest of the forward
    sees instead of `output` (a copy when recording with copies, else None: unchanged)."""
    x = x.detach()
    if copy:
        x = x.clone()
    call.append((x, x._version, output, output._version))
    return output.clone() if copy else None


def _composite_forward(module: nn.Module, sink: list, copy: bool, thread: int, own: Callable | None):
    """The recording forward of a composite module (bound to it while recording, for `thread`'s calls;
    other threads run its instance-level forward `own`, if it had one, else its class's)."""
    def forward(*args, **kwargs):
        if threading.get_ident() != thread:
            return own(*args, **kwargs) if own is not None else type(module).forward(module, *args, **kwargs)
        call = []
        sink.append(call)
        return _COMPOSITES[type(module)][0](module, call, copy, *args, **kwargs)
    return forward


def _attention_forward(module: nn.MultiheadAttention, call: list, copy: bool, query: Tensor, key: Tensor,
                       value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
                       attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False):
    """`nn.MultiheadAttention.forward` for self-attention, decomposed so that the inputs and
    outputs of in_proj and out_proj are recorded in `call`. Masks follow PyTorch: boolean True
    (or -inf) masks a position out, float masks are added to the scores."""
    if not (query is key and key is value):
        raise UnsupportedModel("MultiheadAttention: the layer-wise rule covers self-attention (query is key is value)")
    if (not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn
            or (module.training and module.dropout > 0) or query.ndim != 3):
        raise UnsupportedModel("MultiheadAttention with separate q/k/v weights, bias_k/v, add_zero_attn, "
                               "dropout in training or unbatched input: no layer-wise rule")
    x = query if module.batch_first else query.transpose(0, 1)
    n, t, e = x.shape
    heads = module.num_heads
    qkv = F.linear(x, module.in_proj_weight, module.in_proj_bias)
    qkv = _or(_keep(call, x, qkv, copy), qkv)
    q, k, v = (part.reshape(n, t, heads, e // heads).transpose(1, 2) for part in qkv.chunk(3, -1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(e // heads)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    if attn_mask is not None:  # (t, t), or (n heads, t, t) with the heads of a sample together
        mask = _additive(attn_mask, x.dtype)
        scores = scores + (mask.reshape(n, heads, t, t) if mask.ndim == 3 else mask)
    if key_padding_mask is not None:
        scores = scores + _additive(key_padding_mask, x.dtype).reshape(n, 1, 1, t)
    weights = scores.softmax(-1)
    ctx = (weights @ v).transpose(1, 2).reshape(n, t, e)
    out = F.linear(ctx, module.out_proj.weight, module.out_proj.bias)
    out = _or(_keep(call, ctx, out, copy), out)
    out = out if module.batch_first else out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, weights.mean(1) if average_attn_weights else weights


def _or(replacement: Tensor | None, tensor: Tensor) -> Tensor:
    return tensor if replacement is None else replacement


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = masked out) as -inf / 0 scores; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _linear_rule(module: nn.Linear, params, x: Tensor, delta: Tensor):
    if x.ndim != 2:   # over token positions
        return _positions_linear(x, delta, "weight" in params, "bias" in params)
    factors = LinearFactors(x=x, delta=delta, bias="bias" in params, weight="weight" in params)
    n, d, out = delta.shape
    p_layer = (x.shape[1] if factors.weight else 0) * out + (out if factors.bias else 0)
    if p_layer <= 2 * (x.shape[1] + d * out):
        # Tiny layers (e.g. 2 inputs, or 1 output): the factored grams would be GEMMs with an
        # inner dimension of 1-2; the materialised gradient is barely larger and runs faster.
        return DenseFactors(materialise([factors]))
    return factors


def _positions_linear(x: Tensor, delta: Tensor, weight: bool, bias: bool, kind: str = "linear") -> TokenFactors:
    """A linear map applied at every position of `x` `(n, *positions, in)`, `delta` `(n, d, *positions, out)`,
    as per-token factors (`TokenFactors`, of `kind` "linear" or "transposed")."""
    n, d = delta.shape[:2]
    xs = x.reshape(n, -1, x.shape[-1])
    return TokenFactors(xs, delta.reshape(n, d, xs.shape[1], delta.shape[-1]), kind, weight, bias)


def _transposed_linear_rule(module: nn.Module, params, x: Tensor, delta: Tensor) -> TokenFactors:
    """Hugging Face's `Conv1D` (GPT-2): x @ weight + bias, the weight stored `(in, out)`."""
    return _positions_linear(x, delta, "weight" in params, "bias" in params, kind="transposed")


#: RMS-norm modules whose form x_hat * weight was checked (on their first chunk): the form is their
#: code's, so later chunks skip the check (a second forward and a comparison: 13% of Llama's soft density).
_RMS_FORM_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _rms_norm_rule(module: nn.Module, params, x: Tensor, delta: Tensor):
    """An RMS norm, output = x_hat * weight with x_hat computed from x alone (torch's RMSNorm,
    Llama's): x_hat is the module's output with a weight of ones, and the form is checked on the
    module's first chunk (another form, e.g. Gemma's x_hat * (1 + weight), goes to the generic rule)."""
    if set(params) != {"weight"}:
        return None
    weight = params["weight"].detach()
    with torch.no_grad():
        x_hat = functional_call(module, {"weight": torch.ones_like(weight)}, (x,))
        if module not in _RMS_FORM_CHECKED:
            if not torch.allclose(x_hat * weight, functional_call(module, {"weight": weight}, (x,)), rtol=1e-5,
                                  atol=0):
                return None
            _RMS_FORM_CHECKED.add(module)
    return _affine_grads(params, x_hat, delta, tuple(range(2, delta.ndim - weight.ndim)))


def _conv_rule(module: nn.Conv1d | nn.Conv2d, params, x: Tensor, delta: Tensor):
    if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    kernel, dilation, padding, stride = module.kernel_size, module.dilation, module.padding, module.stride
    if isinstance(module, nn.Conv1d):  # a Conv2d with a 1-high kernel over a 1-high image
        x, delta = x.unsqueeze(2), delta.unsqueeze(3)
        kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
    n, d = delta.shape[:2]
    parts = []
    if "weight" in params:
        cols = F.unfold(x, kernel, dilation, padding, stride)
        parts.append(torch.einsum("naop,nkp->naok", delta.flatten(3), cols).reshape(n, d, -1))
    if "bias" in params:
        parts.append(delta.sum((3, 4)))
    return DenseFactors(torch.cat(parts, 2))


def _embedding_rule(module: nn.Embedding, params, x: Tensor, delta: Tensor):
    if module.max_norm is not None:  # renormalises rows in place during the forward: generic rule
        return None
    n, d = delta.shape[:2]
    ids = x.reshape(n, -1)
    ds = delta.reshape(n, d, ids.shape[1], module.embedding_dim)
    if module.padding_idx is not None:          # F.embedding gives that row no gradient
        ds = ds.masked_fill((ids == module.padding_idx)[:, None, :, None], 0.0)
    # per-token factors: `dense` adds each token's Delta into its row (scatter_add, not a one-hot product)
    return TokenFactors(ids, ds, "embedding", rows=module.num_embeddings)


def _affine_grads(params, x_hat: Tensor, delta: Tensor, positions: tuple[int, ...]) -> DenseFactors:
    """Per-sample gradients of an elementwise affine map x_hat * weight + bias, summed over the
    `positions` dimensions of `delta` `(n, d, *out_shape)` (those that share a weight entry)."""
    n, d = delta.shape[:2]

    def total(t: Tensor) -> Tensor:
        return t.sum(positions) if positions else t  # sum(()) would sum over every dimension

    grads = {"weight": lambda: total(x_hat.unsqueeze(1) * delta), "bias": lambda: total(delta)}
    return DenseFactors(torch.cat([grads[k]().reshape(n, d, -1) for k in params], 2))


def _layer_norm_rule(module: nn.LayerNorm, params, x: Tensor, delta: Tensor):
    x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    return _affine_grads(params, x_hat, delta, tuple(range(2, delta.ndim - len(module.normalized_shape))))


def _group_norm_rule(module: nn.GroupNorm, params, x: Tensor, delta: Tensor):
    x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine_grads(params, x_hat, delta, tuple(range(3, delta.ndim)))


def _batch_norm_rule(module: nn.modules.batchnorm._BatchNorm, params, x: Tensor, delta: Tensor):
    if module.training or module.running_mean is None:  # batch statistics couple the samples
        return None
    shape = (1, -1) + (1,) * (x.ndim - 2)
    x_hat = (x - module.running_mean.reshape(shape)) / (module.running_var.reshape(shape) + module.eps).sqrt()
    return _affine_grads(params, x_hat, delta, tuple(range(3, delta.ndim)))


def _attention_rule(module: nn.MultiheadAttention, params, records: list) -> list:
    """in_proj and out_proj as linear maps over the tokens (`_positions_linear`), from the pairs
    recorded by `_attention_forward`."""
    entries = []
    for (x, delta), (weight, bias) in zip(records, (("in_proj_weight", "in_proj_bias"),
                                                    ("out_proj.weight", "out_proj.bias"))):
        if weight in params or bias in params:
            entry = _positions_linear(x, delta, weight in params, bias in params)
            entry.names = tuple(k for k in (weight, bias) if k in params)
            entries.append(entry)
    return entries


def _generic_rule(module: nn.Module, params, x: Tensor, delta: Tensor) -> DenseFactors:
    """Per-sample gradients of the module's direct parameters, for any module.

    Each sample gets its own copy of the parameters (expanded to `(n, ...)`), the module runs
    once, vmapped over (copy, sample), and one batched backward per output row with cotangent
    Delta gives every copy's gradient: per-sample gradients without per-sample backwards.
    """
    n, d = delta.shape[:2]
    copies = {k: p.detach().unsqueeze(0).expand(n, *p.shape).clone().requires_grad_() for k, p in params.items()}
    with torch.enable_grad():
        out = vmap(lambda p, xi: functional_call(module, p, (xi.unsqueeze(0),))[0])(copies, x)
        rows = []
        for a in range(d):
            grads = torch.autograd.grad(out, list(copies.values()), grad_outputs=delta[:, a], retain_graph=a < d - 1)
            rows.append(torch.cat([g.reshape(n, -1) for g in grads], 1))
    return DenseFactors(torch.stack(rows, 1))


#: One rule per module type: rule(module, {name: trainable parameter}, recorded input, Delta
#: `(n, d, *output_shape)`) -> `LinearFactors` / `DenseFactors`, or None for the generic rule.
_RULES = {
    nn.Linear: _linear_rule, nn.Conv1d: _conv_rule, nn.Conv2d: _conv_rule, nn.Embedding: _embedding_rule,
    nn.LayerNorm: _layer_norm_rule, nn.GroupNorm: _group_norm_rule, nn.BatchNorm1d: _batch_norm_rule,
    nn.BatchNorm2d: _batch_norm_rule, nn.BatchNorm3d: _batch_norm_rule,
}
if hasattr(nn, "RMSNorm"):   # torch >= 2.4
    _RULES[nn.RMSNorm] = _rms_norm_rule


def _rule_for(module: nn.Module):
    """The rule for this module's type (None: the generic rule). Hugging Face's own layers are
    matched by name, so that netsim never imports `transformers`."""
    rule = _RULES.get(type(module))
    if rule is None:
        name, home = type(module).__name__, type(module).__module__
        if name == "Conv1D" and home.startswith("transformers"):
            rule = _transposed_linear_rule
        elif name.endswith("RMSNorm"):
            rule = _rms_norm_rule
    return rule


#: Modules that own their children's parameters and record several linear maps per call:
#: type -> (recording forward, rule(module, params, [(input, Delta), ...]) -> [entries with names]).
_COMPOSITES = {nn.MultiheadAttention: (_attention_forward, _attention_rule)}


def factorise(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None = None,
              targets: Tensor | None = None, *, copy: bool | None = None, params: ParamSpec = None) -> list:
    """Per-layer factors of the per-sample Jacobians of one chunk of inputs.

    Args:
        model, inputs, output_fn, targets: as in `per_sample_grads`.
        copy: record module inputs and outputs as copies (needed when the forward modifies
            them in place); None finds out, at the price of a second forward when it is needed
            (`factorise_layout` tells which, for the next chunks).

    Returns:
        A list, in `named_modules` order of the parameter owners, of `LinearFactors` /
        `DenseFactors`. Their parameter order matches `per_sample_grads` when the modules
        are registered in the order their parameters are (true for ordinary models).

    Raises:
        UnsupportedModel: shared parameters, a module run more than once, a module with
            several tensor inputs; `InPlaceModified` with `copy=False` when copies are needed.
        NonFiniteError: samples with NaN or inf gradients (blamed on inputs, outputs or gradients).
    """
    return factorise_layout(model, inputs, output_fn, targets, copy=copy, params=params)[0]


def factorise_layout(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None = None,
                     targets: Tensor | None = None, *, copy: bool | None = None,
                     params: ParamSpec = None, verify: bool = False, tokens: bool = False) -> tuple[list, bool]:
    """`factorise`, and whether the recording needed copies (pass it as `copy` next time).

    With `verify` (the engines' one-sample probe), the same backward passes also give the
    gradient of each parameter summed over the chunk, by autograd, and the factors must add up
    to it: a parameter also used outside its module's forward (`x @ self.enc.weight` in a
    parent's forward), which no hook sees, raises `UnsupportedModel` instead of a wrong kernel.

    With `tokens`, the maps shared by token positions (Linear over tokens, `Conv1D`, Embedding,
    attention projections) stay as per-token factors (`TokenFactors`; a tied parameter used only
    by such maps: `TokenSum`), whose `(n, d, out in)` gradients are never formed: for the
    sketches of `netsim.sketch`. The other kernel operations of this module take dense entries.
    """
    check_model(model)
    check_batch(model, inputs, targets)
    with model_lock(model):   # hooks and a recording forward on the model: one thread at a time (`threads`)
        return _factorise_layout(model, inputs, output_fn, targets, copy, params, verify, tokens)


def _factorise_layout(model, inputs, output_fn, targets, copy, params, verify, tokens) -> tuple[list, bool]:
    owners = _param_modules(model, params)
    selected = trainable_parameters(model, params)
    with torch.enable_grad():
        out, records, copy = _record(model, inputs, owners, copy)
        if output_fn is not None:
            out = output_fn(out) if targets is None else output_fn(out, targets)
        out = as_output_matrix(out, input_rows(inputs))
        n, d = out.shape
        layer_outputs = [o for pairs in records for _, o in pairs]
        wrt = layer_outputs + (list(selected.values()) if verify else [])
        deltas = [[] for _ in wrt]
        for a in range(d):
            grads = torch.autograd.grad(out[:, a].sum(), wrt, retain_graph=a < d - 1, allow_unused=True)
            for k, (g, o) in enumerate(zip(grads, wrt)):
                deltas[k].append(torch.zeros_like(o) if g is None else g)
    totals = [torch.stack(t).detach() for t in deltas[len(layer_outputs):]]   # (d, *param.shape) each
    deltas = iter([(delta[0].unsqueeze(1) if d == 1 else torch.stack(delta, 1)).detach()   # (n, d, *out)
                   for delta in deltas[:len(layer_outputs)]])
    full_names = {id(p): name for name, p in selected.items()}
    factors = []
    for (_, module, params), pairs in zip(owners, records):
        pairs = [(x, next(deltas)) for x, _ in pairs]
        if type(module) in _COMPOSITES:
            entries = _COMPOSITES[type(module)][1](module, params, pairs)
        else:
            (x, delta), = pairs
            rule = _rule_for(module)
            entry = rule(module, params, x, delta) if rule is not None else None
            entry = entry if entry is not None else _generic_rule(module, params, x, delta)
            entry.names = tuple(params)
            entries = [entry]
        local = dict(module.named_parameters()) if type(module) in _COMPOSITES else module._parameters
        for entry in entries:   # the names of `named_parameters` (the first owner's, for a tied parameter)
            entry.names = tuple(full_names[id(local[k])] for k in entry.names)
        factors += entries
    sizes = {k: p.numel() for k, p in selected.items()}
    factors = _merge_tied(_tied_token_sums(factors) if tokens else [_dense(f) for f in factors], sizes)
    if verify:
        _check_sums(factors, selected, totals)
    bad = torch.zeros(input_rows(inputs), dtype=torch.bool, device=out.device)
    for t in entry_tensors(factors):
        if t.is_floating_point():
            bad |= nonfinite_rows(t)
    if bool(bad.any()):
        raise nonfinite_error(model, inputs, output_fn, targets, bad)
    return factors, copy


def _check_sums(factors: list, selected: dict[str, Tensor], totals: list[Tensor]) -> None:
    """Raises `UnsupportedModel` unless the factors' per-sample gradients, summed over the chunk,
    equal autograd's `totals` (`(d, *shape)` per selected parameter) to float rounding."""
    summed_rules = materialise(factors, selected).sum(0)          # (d, p)
    overall = max(float(t.abs().max()) for t in totals)
    offset = 0
    for (name, p), total in zip(selected.items(), totals):
        rule, total = summed_rules[:, offset:offset + p.numel()], total.reshape(total.shape[0], -1)
        offset += p.numel()
        # relative to the parameter's own scale, and to the whole gradient's for gradients that are
        # zero but for rounding (a key projection's bias: softmax ignores a shift shared by all keys)
        if float((rule - total).abs().max()) > 1e-3 * float(total.abs().max()) + 1e-5 * overall:
            raise UnsupportedModel(f"parameter {name!r} is also used outside its module's forward (e.g. a weight "
                                   "read directly in a parent's forward), where no layer-wise rule sees it "
                                   "(method='jacobian' handles it)")


def _dense(f):
    """A token entry as `DenseFactors` (its gradients formed); any other entry as it is."""
    return f.dense() if isinstance(f, (TokenFactors, TokenSum)) else f


def entry_tensors(factors: list) -> list[Tensor]:
    """The tensors an entry list holds (sizes, devices, finiteness)."""
    out = []
    for f in factors:
        if isinstance(f, TokenSum):
            out += entry_tensors(f.parts)
        else:
            out += [f.grads] if isinstance(f, DenseFactors) else [f.x, f.delta]
    return out


def map_entries(factors: list, fn) -> list:
    """The entries with `fn` applied to each of their per-sample tensors (dense and Linear entries):
    e.g. a slice of the samples, or an empty block of another number of samples."""
    return [DenseFactors(fn(f.grads), f.names) if isinstance(f, DenseFactors) else
            LinearFactors(fn(f.x), fn(f.delta), f.bias, f.weight, f.names) for f in factors]


def entry_shape(f) -> tuple[int, int]:
    """(n samples, d outputs) of an entry."""
    if isinstance(f, TokenSum):
        f = f.parts[0]
    return tuple((f.grads if isinstance(f, DenseFactors) else f.delta).shape[:2])


def _tied_token_sums(factors: list) -> list:
    """Tied parameters in token mode: one `TokenSum` (at the first use) per parameter every use of
    which is a token entry, those entries split per parameter; a token entry sharing a parameter
    with a dense entry is formed (`_merge_tied` then adds them up as dense blocks)."""
    uses = Counter(name for f in factors for name in f.names)
    tied = {name for name, count in uses.items() if count > 1}
    if not tied:
        return factors
    pieces = [piece for f in factors for piece in (f.split() if isinstance(f, TokenFactors) and
                                                   tied & set(f.names) else [f])]
    token_only = {name for name in tied if all(isinstance(f, TokenFactors) for f in pieces if name in f.names)}
    out, sums = [], {}
    for f in pieces:
        name = f.names[0] if len(f.names) == 1 else None
        if name in token_only and name in sums:
            sums[name].parts.append(f)
        elif name in token_only:
            sums[name] = TokenSum([f], (name,))
            out.append(sums[name])
        else:
            out.append(_dense(f) if tied & set(f.names) else f)
    return out


def _merge_tied(factors: list, sizes: dict[str, int]) -> list:
    """One entry per parameter: the entries of a parameter used by several modules (tied weights)
    are materialised, split per parameter, and that parameter's parts summed (every rule lays a
    parameter's per-sample gradient out in the parameter's own shape, so the parts add up)."""
    uses = Counter(name for f in factors for name in f.names)
    if all(count == 1 for count in uses.values()):
        return factors
    out, tied = [], {}
    for f in factors:
        if all(uses[name] == 1 for name in f.names):
            out.append(f)
            continue
        grads, offset = materialise([f]), 0
        for name in f.names:
            part = grads[:, :, offset:offset + sizes[name]]
            offset += sizes[name]
            if name in tied:
                tied[name].grads += part
            else:
                out.append(DenseFactors(part.clone(), (name,)))
                if uses[name] > 1:
                    tied[name] = out[-1]
    return out


def sums_as_parameters(factors: list, sums: list, row: int, model: nn.Module) -> dict[str, Tensor]:
    """Row `row` of a `summed` result as a parameter-shaped dict {name: tensor} (a tangent)."""
    shapes = {k: p.shape for k, p in model.named_parameters()}
    out = {}
    for f, s in zip(factors, sums):
        if isinstance(f, TokenFactors):   # (weight, bias) already in the parameters' layout
            for name, t in zip(f.names, [t for t in s if t is not None]):
                out[name] = t[row]
            continue
        if isinstance(f, DenseFactors):
            flat, offset = s[row], 0
            for name in f.names:
                size = shapes[name].numel()
                out[name] = flat[offset:offset + size].reshape(shapes[name])
                offset += size
        else:
            w, b = s
            parts = ([w[row]] if f.weight else []) + ([b[row]] if f.bias else [])
            for name, t in zip(f.names, parts):
                out[name] = t
    return out


def materialise(factors: list, parameters: dict[str, Tensor] | None = None, out: Tensor | None = None) -> Tensor:
    """The full `(n, d, p)` Jacobians from the factors, their parameters in the factors' order or,
    given `parameters` ({full name: parameter}, e.g. `trainable_parameters(model)`), in its order:
    the layout of `per_sample_grads`. Each block is written straight into `out` (a `(n, d, p)`
    tensor, e.g. a slice of a preallocated result) when given, else into a new tensor."""
    sizes = None if parameters is None else {name: p.numel() for name, p in parameters.items()}
    blocks = [block for f in factors for block in _parameter_blocks(f, sizes)]   # [(name, columns, write)]
    columns, offset = {}, 0
    for name, size in (sizes or {}).items():
        columns[name] = slice(offset, offset + size)
        offset += size
    if sizes is None:   # the factors' own order
        for k, (_, size, _) in enumerate(blocks):
            columns[k] = slice(offset, offset + size)
            offset += size
    if out is None:
        out = entry_tensors(factors[:1])[-1].new_empty(*entry_shape(factors[0]), offset)
    for k, (name, _, write) in enumerate(blocks):
        write(out[:, :, columns[k if sizes is None else name]])
    return out


def _parameter_blocks(f, sizes: dict[str, int] | None) -> list:
    """`(parameter name, columns, write(target (n, d, columns)))` of an entry: one per parameter given
    their `sizes`, else the dense block whole and a Linear layer's weight and bias."""
    f = _dense(f)
    if isinstance(f, DenseFactors):
        if sizes is None:
            return [(None, f.grads.shape[2], lambda target: target.copy_(f.grads))]
        blocks, offset = [], 0
        for name in f.names:
            part = f.grads[:, :, offset:offset + sizes[name]]
            blocks.append((name, sizes[name], lambda target, part=part: target.copy_(part)))
            offset += sizes[name]
        return blocks
    names = iter(f.names if sizes is not None else ())
    n, d, width = f.delta.shape
    blocks = []
    if f.weight:   # grad_W^a = delta^a x^T, an outer product written in place
        blocks.append((next(names, None), width * f.x.shape[1], lambda target: torch.mul(
            f.delta.unsqueeze(3), f.x[:, None, None, :], out=target.view(n, d, width, f.x.shape[1]))))
    if f.bias:
        blocks.append((next(names, None), width, lambda target: target.copy_(f.delta)))
    return blocks

def transform(factors: list, left: Tensor) -> list:
    """Left-multiplies every sample's Jacobian by a `(n, d, d)` matrix (e.g. K(x, x)^-1/2).

    It only mixes output rows, so it acts on Delta and on the dense blocks."""
    out = []
    for f in factors:
        if isinstance(f, DenseFactors):
            out.append(DenseFactors(left @ f.grads))
        elif isinstance(f, TokenFactors):
            n, d, t, width = f.delta.shape
            delta = (left @ f.delta.reshape(n, d, t * width)).reshape(n, d, t, width)
            out.append(TokenFactors(f.x, delta, f.kind, f.weight, f.bias, f.rows, f.names))
        else:
            out.append(LinearFactors(f.x, left @ f.delta, f.bias, f.weight))
    return out


def gram(fx: list, fy: list, *, trace: bool) -> Tensor:
    """Sum over layers of J_x J_y^T: `(nx, ny, d, d)`, or its trace `(nx, ny)` if `trace`."""
    return _gram_trace(fx, fy) if trace else _gram_matrices(fx, fy)


def _gram_trace(fx: list, fy: list) -> Tensor:
    """Trace gram accumulated in place with two reused (nx, ny) buffers: fresh N x N outputs
    per layer were measured to halve the GEMM rate on this machine. A block with itself
    (`fx is fy`) multiplies only the upper tiles of its dense entries (`add_gram_`)."""
    symmetric = fx is fy
    total = buf_in = buf_dd = None
    for a, b in zip(fx, fy):
        left = a.grads if isinstance(a, DenseFactors) else a.delta
        nx, ny = left.shape[0], (b.grads if isinstance(b, DenseFactors) else b.delta).shape[0]
        if total is None:
            total = torch.zeros(nx, ny, dtype=left.dtype, device=left.device)
        if isinstance(a, DenseFactors):
            add_gram_(total, a.grads.reshape(nx, -1), b.grads.reshape(ny, -1), symmetric)
            continue
        if buf_in is None:
            buf_in, buf_dd = torch.empty_like(total), torch.empty_like(total)
        if a.weight:
            torch.mm(a.x, b.x.T, out=buf_in)
        else:
            buf_in.zero_()
        if a.bias:
            buf_in.add_(1.0)
        torch.mm(a.delta.reshape(nx, -1), b.delta.reshape(ny, -1).T, out=buf_dd)
        total.addcmul_(buf_dd, buf_in)
    return mirror_upper_(total) if symmetric else total


#: Rows of the tiles of a symmetric gram (`add_gram_`).
SYMMETRIC_TILE = 256


def add_gram_(total: Tensor, a: Tensor, b: Tensor, symmetric: bool) -> Tensor:
    """`total += a b^T` for `(nx, k)` and `(ny, k)` rows. When `symmetric` (b is a), only the tiles
    on and above the diagonal are multiplied (about half the flops of a large block): the tiles
    below it are left to `mirror_upper_`, which the caller runs once after its last addition."""
    n = a.shape[0]
    if not symmetric or n <= SYMMETRIC_TILE:
        return total.addmm_(a, b.T)
    for i in range(0, n, SYMMETRIC_TILE):
        rows = slice(i, i + SYMMETRIC_TILE)
        total[rows, i:].addmm_(a[rows], a[i:].T)
    return total


def symmetric_products(n: int) -> int:
    """The (row, column) products `add_gram_` executes for a block of n rows with itself."""
    return sum(min(SYMMETRIC_TILE, n - i) * (n - i) for i in range(0, n, SYMMETRIC_TILE)) if n > SYMMETRIC_TILE \
        else n * n


def mirror_upper_(total: Tensor) -> Tensor:
    """Copies the tiles above the diagonal of a square `total` onto those below it (in place): the
    end of a symmetric accumulation by `add_gram_` (whose diagonal tiles are complete; every other
    symmetric addition may have filled the lower tiles too, and they are overwritten with the same sums)."""
    n = total.shape[0]
    for i in range(SYMMETRIC_TILE, n, SYMMETRIC_TILE):
        total[i:, i - SYMMETRIC_TILE:i] = total[i - SYMMETRIC_TILE:i, i:].T
    return total


def _gram_matrices(fx: list, fy: list) -> Tensor:
    """`(nx, ny, d, d)` gram blocks, accumulated in place."""
    total = None
    for a, b in zip(fx, fy):
        if isinstance(a, DenseFactors):
            nx, d, p = a.grads.shape
            ny = b.grads.shape[0]
            block = (a.grads.reshape(nx * d, p) @ b.grads.reshape(ny * d, p).T).reshape(nx, d, ny, d)
            block = block.permute(0, 2, 1, 3)
        else:
            nx, d, o = a.delta.shape
            ny = b.delta.shape[0]
            inputs = a.x @ b.x.T if a.weight else torch.zeros(nx, ny, dtype=a.x.dtype, device=a.x.device)
            if a.bias:
                inputs.add_(1.0)
            dd = (a.delta.reshape(nx * d, o) @ b.delta.reshape(ny * d, o).T).reshape(nx, d, ny, d).permute(0, 2, 1, 3)
            block = dd.mul_(inputs[:, :, None, None])
            del inputs
        if total is None:
            total = block.contiguous()
        else:
            total.add_(block)
        del block
    return total


def self_gram(factors: list) -> Tensor:
    """K(x, x) for every sample of the chunk, `(n, d, d)`, without any cross-sample work (a token
    entry's from its tokens' grams: O(T^2 (in + d out)), its gradient never formed)."""
    total = None
    for f in factors:
        if isinstance(f, DenseFactors):
            block = f.grads @ f.grads.transpose(1, 2)
        elif isinstance(f, TokenFactors):
            block = _token_self_gram(f)
        else:
            sq = (f.x * f.x).sum(1) if f.weight else torch.zeros(f.x.shape[0], dtype=f.x.dtype, device=f.x.device)
            block = (f.delta @ f.delta.transpose(1, 2)) * (sq + (1.0 if f.bias else 0.0))[:, None, None]
        total = block if total is None else total + block
    return total


def summed(factors: list) -> list:
    """sum over the chunk of each output row's Jacobian, per layer: `(d, out, in)` / `(d, p_layer)`
    tensors (the first pass of the soft density; O(n d in out) per Linear layer; a token entry's
    (weight, bias) in the weight's own layout, one GEMM over every token of the chunk)."""
    out = []
    for f in factors:
        if isinstance(f, DenseFactors):
            out.append(f.grads.sum(0))
        elif isinstance(f, TokenFactors):
            out.append(_token_sums(f))
        else:
            w = torch.einsum("nao,ni->aoi", f.delta, f.x) if f.weight else None
            b = f.delta.sum(0) if f.bias else None
            out.append((w, b))
    return out


def add_sums(s1: list | None, s2: list) -> list:
    """Adds two `summed` results (either may come from another chunk or process)."""
    if s1 is None:
        return s2
    return [a + b if isinstance(a, Tensor) else
            (None if a[0] is None else a[0] + b[0], None if a[1] is None else a[1] + b[1])
            for a, b in zip(s1, s2)]


def dot_with_sums(factors: list, sums: list) -> Tensor:
    """J(x) S^T for every sample: `(n, d, d_S)`, entry [n, a, b] = J^a(x_n) . S^b (second pass)."""
    total = None
    for f, s in zip(factors, sums):
        if isinstance(f, DenseFactors):
            block = f.grads @ s.T
        elif isinstance(f, TokenFactors):
            block = _token_dot(f, *s)
        else:
            w, b = s
            block = 0.0
            if w is not None:   # J^a . S^b = delta^a . (W_S^b x): (n, d, d_S, in) then contract x
                block = block + torch.einsum("nabi,ni->nab", torch.einsum("nao,boi->nabi", f.delta, w), f.x)
            if b is not None:
                block = block + f.delta @ b.T
        total = block if total is None else total + block
    return total


def _token_self_gram(f: TokenFactors) -> Tensor:
    """`(n, d, d)` K(x, x) of a token entry: sum_ts (delta^a_t . delta^b_s)(x_t . x_s) for a linear map
    (its bias adds (sum_t delta^a_t) . (sum_s delta^b_s)), [id_t = id_s] in place of x_t . x_s for an
    embedding."""
    n, d, t, _ = f.delta.shape
    deltas = f.delta.reshape(n, d * t, -1)
    pairs = (deltas @ deltas.transpose(1, 2)).reshape(n, d, t, d, t)          # delta^a_t . delta^b_s
    if f.kind == "embedding":
        inputs = (f.x[:, :, None] == f.x[:, None, :]).to(f.delta.dtype)
    else:
        inputs = f.x @ f.x.transpose(1, 2) if f.weight else torch.zeros_like(pairs[:, 0, :, 0])
        if f.bias:
            inputs = inputs + 1.0
    return torch.einsum("natbs,nts->nab", pairs, inputs)


def _token_sums(f: TokenFactors) -> tuple[Tensor | None, Tensor | None]:
    """(weight, bias) sums over the chunk of a token entry's per-sample gradients, `(d, *weight.shape)`
    and `(d, out)`: a GEMM over all of the chunk's tokens (a scatter of their Deltas for an embedding)."""
    n, d, t, width = f.delta.shape
    if f.kind == "embedding":
        rows = f.delta.new_zeros(d, f.rows, width)
        return rows.index_add_(1, f.x.reshape(-1), f.delta.transpose(0, 1).reshape(d, n * t, width)), None
    pattern = "nato,nti->aio" if f.kind == "transposed" else "nato,nti->aoi"
    weight = torch.einsum(pattern, f.delta, f.x) if f.weight else None
    return weight, (f.delta.sum((0, 2)) if f.bias else None)


def _token_dot(f: TokenFactors, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """`(n, d, d_S)` J^a(x) . S^b of a token entry against `_token_sums`-shaped (weight, bias): each
    token's Delta against the sum's weight applied to its input (an embedding: the sum's rows at its ids)."""
    n, d, t, width = f.delta.shape
    if f.kind == "embedding":
        applied = weight[:, f.x].permute(1, 2, 0, 3)                           # (n, T, d_S, dim)
    elif weight is not None:   # every token's input through the sum's weights: one GEMM, (n, T, d_S, out)
        columns = weight.transpose(1, 2) if f.kind == "linear" else weight     # (d_S, in, out)
        applied = (f.x.reshape(n * t, -1) @ columns.permute(1, 0, 2).reshape(columns.shape[1], -1))
        applied = applied.reshape(n, t, weight.shape[0], width)
    block = 0.0
    if f.kind == "embedding" or weight is not None:   # sum over tokens and outputs: (n, d, T out) x (n, T out, d_S)
        block = f.delta.reshape(n, d, t * width) @ applied.transpose(2, 3).reshape(n, t * width, -1)
    if bias is not None:
        block = block + f.delta.sum(2) @ bias.T
    return block


def sums_as_tensors(sums: list) -> list[Tensor]:
    """The tensors inside a `summed` result, in a fixed order (e.g. for all_reduce)."""
    return [t for s in sums for t in ((s,) if isinstance(s, Tensor) else s) if t is not None]
