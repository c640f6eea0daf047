"""Validation shared by the public functions: one home for the checks on models, inputs,
options and outputs, so every entry point raises the same clear error for the same mistake.

Every public function that takes a model runs `check_model` and `check_batch` before its
first forward pass: a refused call never runs the model, so it leaves the parameters,
buffers (BatchNorm running statistics), training flags and hooks as they were.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .data import Source, TensorSource

_MODES_THAT_MIX_SAMPLES = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
#: Parameter dtypes the kernels are computed in. Half precisions are refused: their per-sample
#: gradients carry ~3 significant digits, too few to separate the rank of K(x, x) (a classifier's
#: null direction) from rounding, and their range cannot hold J J^T of ordinary outputs.
SUPPORTED_DTYPES = (torch.float32, torch.float64)


class NonFiniteError(ValueError):
    """Some samples have NaN or infinite inputs, outputs or gradients.

    Attributes:
        where: {"inputs" | "outputs" | "gradients": sample indices}, the first stage at which
            each sample became non-finite.
        indices: all those samples, sorted.
    """

    def __init__(self, where: dict[str, list[int]]):
        self.where = {k: v for k, v in where.items() if v}
        self.indices = sorted(i for v in self.where.values() for i in v)
        parts = []
        for stage, rows in self.where.items():
            shown = ", ".join(map(str, rows[:20])) + (" ..." if len(rows) > 20 else "")
            parts.append(f"{stage} of {len(rows)} sample(s) (indices {shown})")
        super().__init__(
            "non-finite values (NaN or inf) in the " + "; ".join(parts) + ": the kernels of these samples are "
            "undefined. Check the data (NaN pixels, division by zero in preprocessing) or the output_fn "
            "(log of 0); on_zero does not apply, it is only about zero gradients.")

    def shifted(self, offset: int) -> NonFiniteError:
        """The same error with every index moved by `offset` (a chunk's position in the data)."""
        return NonFiniteError({k: [i + offset for i in v] for k, v in self.where.items()})


def check_choice(name: str, value, choices: tuple) -> None:
    """Raise ValueError unless `value` is one of `choices` (option strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive_int(name: str, value, *, optional: bool = False) -> None:
    """Raise unless `value` is an int >= 1 (or None when `optional`): chunk and block sizes."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int{' or None (the default)' if optional else ''}, got {value}")


def check_rtol(rtol) -> None:
    """Raise unless `rtol` is None or a float in [0, 1) (a relative eigenvalue cut-off)."""
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1):
        raise ValueError(f"rtol must be None or a number in [0, 1) (relative to the largest eigenvalue), got {rtol!r}")


def check_keywords(given: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """Raise TypeError naming every keyword of `given` that `allowed` lacks (misspelt options)."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}; allowed: {sorted(allowed)}")


def check_model(model: nn.Module) -> None:
    """Raise before any forward pass if the kernels are undefined or inexact for this model.

    Refused: not an `nn.Module`; no trainable parameter; BatchNorm or Dropout in training mode
    (the output then depends on the rest of the batch or on random draws, and a forward pass
    would move the running statistics); half-precision parameters; an active autocast.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (requires_grad=True): "
            "the gradient kernels are defined by parameter gradients, so there is nothing to compare.")
    for name, module in model.named_modules():
        if module.training and type(module).__module__.startswith("transformers"):
            # Hugging Face modules branch on self.training (functional dropout, gradient checkpointing)
            raise ValueError(
                f"{type(module).__name__} {name or 'model'!r} is in training mode: Hugging Face models apply "
                "dropout (and other training-only steps) in training mode, so the output is random and a "
                "per-sample gradient is not defined. Call model.eval() first.")
        if module.training and isinstance(module, _MODES_THAT_MIX_SAMPLES):
            raise ValueError(
                f"module {name or type(model).__name__!r} ({type(module).__name__}) is in training "
                "mode: its output depends on the rest of the batch or on random draws, so a "
                "per-sample gradient is not defined. Call model.eval() first.")
    low = sorted({str(p.dtype) for _, p in trainable if p.dtype not in SUPPORTED_DTYPES})
    if low:
        raise TypeError(
            f"the model has {', '.join(low)} parameters: netsim computes per-sample gradients and their "
            "kernels in float32 or float64 (half precisions cannot resolve the rank of K(x, x) and overflow "
            "on J J^T). Pass a float32 copy, e.g. copy.deepcopy(model).float(), with float32 inputs.")
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            raise RuntimeError(f"netsim was called inside torch.autocast({device!r}): the per-sample gradients "
                               "would be computed in half precision. Call it outside the autocast context.")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first trainable parameter."""
    return next(p for p in model.parameters() if p.requires_grad).device


def check_batch(model: nn.Module, inputs, targets: Tensor | None = None, *,
                name: str = "inputs", targets_name: str = "targets") -> None:
    """Raise a clear error unless `inputs` is a non-empty `(N, ...)` tensor (or a dict of such
    tensors, keyword inputs, sharing N) on the model's device and `targets`, if given, is a
    tensor with one row per input on the same device. Shapes only: no pass over the data."""
    if isinstance(inputs, dict):
        if not inputs:
            raise ValueError(f"{name} is an empty dict: no keyword input for the model")
        for key, value in inputs.items():
            check_batch(model, value, None, name=f"{name}[{key!r}]")
        rows = {value.shape[0] for value in inputs.values()}
        if len(rows) != 1:
            raise ValueError(f"the tensors of {name} have different numbers of rows: "
                             + ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items()))
        n = rows.pop()
        _check_tokens(model, inputs, name)
    else:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.ndim == 0 or inputs.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(inputs.shape)}")
        device = model_device(model)
        if inputs.device != device:
            raise ValueError(f"{name} are on {inputs.device} but the model's parameters are on {device}: "
                             f"move one of them (e.g. {name}.to(device)).")
        if inputs.is_floating_point() and inputs.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} are {inputs.dtype}: netsim works in float32 or float64 (e.g. {name}.float())")
        n = inputs.shape[0]
    if targets is not None:
        if not isinstance(targets, Tensor):
            raise TypeError(f"{targets_name} must be a torch.Tensor with one row per sample, got "
                            f"{type(targets).__name__}")
        if targets.ndim == 0 or targets.shape[0] != n:
            rows = "a scalar" if targets.ndim == 0 else f"{targets.shape[0]} rows"
            raise ValueError(f"{targets_name} has {rows} for {n} {name}: one per sample needed")
        if targets.device != model_device(model):
            raise ValueError(f"{targets_name} are on {targets.device} but the model is on {model_device(model)}")


#: Keyword inputs laid out like the token ids, one entry per token (Hugging Face's names).
_PER_TOKEN_KEYS = ("attention_mask", "token_type_ids", "position_ids")


def _check_tokens(model: nn.Module, inputs: dict, name: str) -> None:
    """Token inputs (`input_ids` and what goes with them): masks and token types of the ids' shape,
    ids within the vocabulary of the model's input embedding (a Hugging Face model's
    `get_input_embeddings()`), so that a padding or tokenizer mistake is named, not an index error."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor):
        return
    for key in _PER_TOKEN_KEYS:
        other = inputs.get(key)
        if isinstance(other, Tensor) and other.ndim == ids.ndim and other.shape != ids.shape:
            raise ValueError(f"{name}[{key!r}] has shape {tuple(other.shape)} but {name}['input_ids'] has "
                             f"{tuple(ids.shape)}: one entry per token needed (pad both to the same length)")
    if ids.is_floating_point():
        raise TypeError(f"{name}['input_ids'] must hold integer token ids, got {ids.dtype}")
    embeddings = getattr(model, "get_input_embeddings", None)
    embedding = embeddings() if callable(embeddings) else None
    if isinstance(embedding, nn.Embedding) and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= embedding.num_embeddings:
            raise ValueError(f"{name}['input_ids'] holds token ids in [{low}, {high}] but the model's vocabulary has "
                             f"{embedding.num_embeddings} tokens (ids 0 to {embedding.num_embeddings - 1}): was "
                             "the data tokenized with this model's tokenizer, and padded with its pad_token_id?")


def check_data(model: nn.Module, source: Source) -> None:
    """`check_batch` on a tensor source, whole, before the model runs. Other data forms are read
    lazily and checked chunk by chunk as they arrive (reading data does not touch the model)."""
    if isinstance(source, TensorSource):
        check_batch(model, source.data, source.targets, name=source.name, targets_name=source.targets_name)


def as_output_matrix(out, batch: int) -> Tensor:
    """Checks that an output batch is `(B, d)`; a `(B,)` output is read as d = 1."""
    if not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
        raise TypeError(
            f"the model (after output_fn) returned a {type(out).__name__}, not a tensor: pass output_fn picking "
            "the output to compare, e.g. netsim.outputs.logits (a classifier's logits), "
            "netsim.outputs.causal_lm_log_likelihood with targets_key='labels' (a language model), or "
            "netsim.outputs.class_vs_rest with the labels as targets.")
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the model (after output_fn) returned a {type(out).__name__}, not a tensor: pass output_fn mapping "
            "the raw output to a (B, d) tensor, e.g. output_fn=lambda out: out[0] for a tuple, "
            "or lambda out: out['logits'] for a dict.")
    if out.ndim == 1 and out.shape[0] == batch:
        return out.unsqueeze(1)
    if out.ndim != 2 or out.shape[0] != batch:
        raise ValueError(
            f"the (reduced) model output must have shape (B, d) = ({batch}, d), got {tuple(out.shape)}. "
            "Pass output_fn mapping the raw output batch to (B, d), e.g. the displacement at the "
            "patch centre, or netsim.outputs.class_vs_rest for a classifier.")
    if out.shape[1] == 0:
        raise ValueError("the (reduced) model output has d = 0 columns: nothing to differentiate")
    return out


def nonfinite_rows(t: Tensor) -> Tensor:
    """`(n,)` bool: rows of `t` holding a NaN or an infinity.

    A row sum is non-finite whenever the row holds a NaN or an inf (inf - inf is NaN), so one
    cheap reduction screens every row (25x faster than `isfinite` on a chunk of Jacobians);
    only the rows it flags, which may merely overflow in the sum, are checked entry by entry.
    """
    flat = t.reshape(t.shape[0], -1)
    flagged = ~torch.isfinite(flat.sum(1))
    if bool(flagged.any()):
        flagged[flagged.clone()] = ~torch.isfinite(flat[flagged]).all(1)
    return flagged


@contextmanager
def buffers_restored_on_error(model: nn.Module) -> Iterator[None]:
    """Runs the block; if it raises, puts the model's buffers (BatchNorm running statistics and
    counters) back as they were before it, so a refused call leaves no trace on the model.
    For the functions that must run the model in training mode (the enforcing criteria)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        raise
