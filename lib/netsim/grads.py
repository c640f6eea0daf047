"""Per-sample Jacobians of a model's (reduced) output with respect to its parameters.

Everything in netsim starts from J(x) = d output_fn(model(x)) / d theta, a `(d, p)` matrix per
sample: d is the output dimension after `output_fn`, p the number of trainable parameters.
The Jacobians are exact, computed with torch.func (`functional_call` + `vmap` + `jacrev`),
and produced chunk by chunk so that callers that only need sums of them never hold all of
them at once.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checks import (
    NonFiniteError,
    as_output_matrix,
    check_batch,
    check_data,
    check_model,
    check_positive_int,
    model_device,
    nonfinite_rows,
)
from .data import Inputs, as_source, index_inputs, input_rows
from .params import ParamSpec, select_parameters
from .threads import model_lock, shared_setting

OutputFn = Callable[..., Tensor]

#: Default number of samples per vmap call: large enough to amortise Python overhead,
#: small enough that `chunk_size * d * p` floats stay modest for ~1M-parameter models.
DEFAULT_CHUNK = 64


def trainable_parameters(model: nn.Module, params: ParamSpec = None) -> dict[str, Tensor]:
    """The parameters the kernels differentiate against, `{name: parameter}` in `named_parameters()` order.

    Args:
        params: None (every parameter with `requires_grad=True`), a list of name patterns or a
            callable `(name, parameter) -> bool` choosing among those (`netsim.params`). The
            model's flags are not changed.

    Raises:
        ValueError: no trainable parameter, or a pattern that matches none.
    """
    return select_parameters(model, params)


def num_parameters(model: nn.Module, params: ParamSpec = None) -> int:
    """p, the length of one flattened per-sample gradient."""
    return sum(p.numel() for p in trainable_parameters(model, params).values())


def output_dim(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None = None,
               targets: Tensor | None = None) -> int:
    """d, the output dimension after `output_fn`, read from a forward pass on one sample
    (after `check_model` and `check_batch`: a refused model is never run)."""
    check_model(model)
    check_batch(model, inputs, targets)
    return reduced_outputs(model, index_inputs(inputs, slice(0, 1)), output_fn,
                           None if targets is None else targets[:1]).shape[1]


@contextmanager
def unfused_attention() -> Iterator[None]:
    """Runs attention by its plain, differentiable operations inside the block; settings restored after.

    In eval mode without gradients, `nn.TransformerEncoderLayer` and `nn.MultiheadAttention`
    run `torch._transformer_encoder_layer_fwd` / `_native_multi_head_attention`, which bypass
    their submodules' hooks and have no forward-mode AD rule (`torch.func.jvp` fails with
    NotImplementedError); `torch.backends.mha.set_fastpath_enabled(False)` turns that fast path
    off. The ordinary path then calls `scaled_dot_product_attention`, whose fused CPU kernels
    have no forward-mode rule either: `sdpa_kernel(SDPBackend.MATH)` keeps it to the math
    backend. Both compute the same function.
    """
    with shared_setting(_unfuse_attention):   # process-wide flags: switched once for all threads inside
        yield


def _unfuse_attention() -> Callable[[], None]:
    """Turns the fused attention paths off; returns the function that restores them."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    math_only = sdpa_kernel(SDPBackend.MATH)
    math_only.__enter__()
    torch.backends.mha.set_fastpath_enabled(False)

    def restore() -> None:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        math_only.__exit__(None, None, None)

    return restore


def run_model(model: nn.Module, inputs: Inputs):
    """`model(inputs)`, or `model(**inputs)` for keyword inputs (a dict batch)."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def reduced_outputs(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None = None,
                    targets: Tensor | None = None) -> Tensor:
    """`(n, d)` output_fn(model(inputs)) without gradients (the caller has checked the model).

    The raw output goes to `output_fn` unchanged (a tuple, a dict, a dataclass such as a Hugging
    Face `ModelOutput`); only the default (no `output_fn`) needs a tensor."""
    with torch.no_grad(), model_lock(model):
        out = run_model(model, inputs)
        if output_fn is not None:
            out = output_fn(out) if targets is None else output_fn(out, targets)
    return as_output_matrix(out, input_rows(inputs))


def nonfinite_error(model: nn.Module, inputs: Tensor, output_fn: OutputFn | None, targets: Tensor | None,
                    bad: Tensor, offset: int = 0) -> NonFiniteError:
    """The `NonFiniteError` for the samples `bad` (`(n,)` bool over `inputs`) whose gradients are
    non-finite, each blamed on the first stage that is: its input, its output, or its gradient.
    Runs the model on those samples only (no gradients; the model is in eval mode)."""
    rows = torch.nonzero(bad.cpu()).flatten()
    x = index_inputs(inputs, rows.to(bad.device))
    in_bad = torch.zeros(len(rows), dtype=torch.bool)
    for t in x.values() if isinstance(x, dict) else (x,):
        if t.is_floating_point():
            in_bad |= nonfinite_rows(t).cpu()
    out_bad = torch.zeros_like(in_bad)
    if not bool(in_bad.all()):
        sub = None if targets is None else targets[rows.to(targets.device)]
        out_bad = nonfinite_rows(reduced_outputs(model, x, output_fn, sub)).cpu() & ~in_bad
    grad_bad = ~(in_bad | out_bad)
    return NonFiniteError({stage: (rows[mask] + offset).tolist() for stage, mask in
                           (("inputs", in_bad), ("outputs", out_bad), ("gradients", grad_bad))})


def _functional_output(model: nn.Module, output_fn: OutputFn | None, selected: dict[str, Tensor]):
    """`output(params, x, t=None) -> (B, d)`: the reduced model output as a function of the
    selected parameters (the others and the buffers held fixed). `x` may be keyword inputs."""
    buffers = dict(model.named_buffers())
    # Detached: the unselected parameters are constants, so no result carries a graph into them.
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in selected}

    def output(params, x, t=None):
        if isinstance(x, dict):
            out = functional_call(model, (params, fixed, buffers), (), x)
        else:
            out = functional_call(model, (params, fixed, buffers), (x,))
        if output_fn is not None:
            out = output_fn(out) if t is None else output_fn(out, t)
        return as_output_matrix(out, input_rows(x))

    return output


def _unsqueeze(x: Inputs) -> Inputs:
    return {k: v.unsqueeze(0) for k, v in x.items()} if isinstance(x, dict) else x.unsqueeze(0)


def _single_sample_jacobian(model: nn.Module, output_fn: OutputFn | None, with_targets: bool,
                            selected: dict[str, Tensor]):
    """Builds `jac(params, x[, t]) -> {name: (d, *param.shape)}` for one unbatched sample."""
    batch_output = _functional_output(model, output_fn, selected)

    def output(params, x, t=None):
        return batch_output(params, _unsqueeze(x), None if t is None else t.unsqueeze(0))[0]

    # chunk_size=1: one vjp per output row instead of a vmap over rows. Nested vmaps (rows
    # inside samples) hit broken batching rules, e.g. PReLU after a convolution in torch 2.13;
    # d is small, so the loop costs little.
    if with_targets:
        return jacrev(output, chunk_size=1)
    return jacrev(lambda params, x: output(params, x), chunk_size=1)


class VmapFallbackWarning(UserWarning):
    """The model cannot run under `torch.func.vmap`: its Jacobians are computed one sample at a time."""


class BatchedJacobian:
    """`(params, x, t) -> {name: (n, d, *param.shape)}`: per-sample Jacobians of a chunk, vmapped.

    A forward with data-dependent control flow (`if mask.all():`, `.item()`, as in Hugging Face
    `transformers`' mask helpers) cannot run under vmap. Then, once per call, a
    `VmapFallbackWarning` names the line, and every chunk is computed one sample at a time:
    the same exact Jacobians, slower (`method="layerwise"` runs the batch as it is).
    """

    def __init__(self, model: nn.Module, output_fn: OutputFn | None, selected: dict[str, Tensor]):
        self.model, self.output_fn, self.selected = model, output_fn, selected
        self.single: dict[bool, Callable] = {}
        self.loop = False

    def __call__(self, params: dict[str, Tensor], x: Inputs, t: Tensor | None) -> dict[str, Tensor]:
        with model_lock(self.model):   # functional_call swaps the model's parameters: one thread at a time
            return self._jacobians(params, x, t)

    def _jacobians(self, params: dict[str, Tensor], x: Inputs, t: Tensor | None) -> dict[str, Tensor]:
        with_targets = t is not None
        if with_targets not in self.single:
            self.single[with_targets] = _single_sample_jacobian(self.model, self.output_fn, with_targets,
                                                                self.selected)
        jac = self.single[with_targets]
        args = (x,) if t is None else (x, t)
        if not self.loop:
            try:
                with unfused_attention(), warnings.catch_warnings():
                    # torch's note that a fused kernel has no batching rule: MATH attention avoids it
                    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                    return vmap(jac, in_dims=(None,) + (0,) * len(args))(params, *args)
            except RuntimeError as error:
                if "vmap" not in str(error) or "data-dependent control flow" not in str(error):
                    raise
                warnings.warn(f"netsim: the model cannot run under torch.func.vmap (data-dependent control flow "
                              f"at {_cause(error)}): the Jacobian engine computes one sample at a time (exact, "
                              "slower); method='layerwise' runs the batch as it is", VmapFallbackWarning,
                              stacklevel=5)
                self.loop = True
        rows = [jac(params, *(index_inputs(a, i) if isinstance(a, dict) else a[i] for a in args))
                for i in range(input_rows(x))]
        return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


def _cause(error: BaseException) -> str:
    """`file:line in function` of the deepest frame of `error` outside torch (the model's code)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "an unknown place"
    frame = frames[-1]
    parts = frame.filename.replace("\\", "/").split("/")
    where = "/".join(parts[-2:])
    return f"{where}:{frame.lineno} in {frame.name}"


def iter_jacobians(
    model: nn.Module,
    inputs,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    targets: Tensor | None = None,
    *,
    params: ParamSpec = None,
    targets_key: str | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yields `(start, J)` with `J` of shape `(n_chunk, d, p)` for consecutive input chunks.

    The flattening order of parameters is `model.named_parameters()` order (selected only),
    the same in every chunk, so chunks can be combined by the caller. One pass over `inputs`.

    Args:
        model: any module; BatchNorm/Dropout must be in eval mode.
        inputs: `(N, ...)` tensor on the model's device, or any data form of `netsim.data`
            (Dataset, DataLoader, iterable of batches; tuple batches carry targets, dict batches
            are keyword inputs), streamed in chunks.
        output_fn: maps the raw output batch to `(B, d)`; called as `output_fn(out)` or, when
            there are targets, `output_fn(out, targets_batch)`.
        chunk_size: samples per vmap call (default `DEFAULT_CHUNK`); the last chunk may be shorter.
        targets: optional `(N, ...)` per-sample side information for `output_fn` (class labels).
        params: the parameters to differentiate against (`netsim.params`; default: all trainable).
        targets_key: the key of the targets in dict batches.

    Raises:
        NonFiniteError: samples whose Jacobian holds NaN or inf (blamed on their input, output
            or gradient), when their chunk is reached.
    """
    check_model(model)
    source = as_source(inputs, targets, targets_key=targets_key, name="inputs", device=model_device(model))
    check_data(model, source)
    check_positive_int("chunk_size", chunk_size, optional=True)
    yield from jacobian_chunks(source, chunk_size or DEFAULT_CHUNK,
                               BatchedJacobian(model, output_fn, trainable_parameters(model, params)))


def jacobian_chunks(source, chunk_size: int, jacobians: BatchedJacobian) -> Iterator[tuple[int, Tensor]]:
    """`iter_jacobians` after its checks, with the caller's `BatchedJacobian` (which remembers,
    across the caller's chunks, that the model cannot run under vmap: one warning per call)."""
    model, output_fn, selected = jacobians.model, jacobians.output_fn, jacobians.selected
    # jacrev differentiates w.r.t. these detached copies, so no graph reaches the model.
    detached = {n: p.detach() for n, p in selected.items()}
    for start, x, t in source.chunks(chunk_size):
        check_batch(model, x, t)
        per_param = jacobians(detached, x, t)
        n, d = input_rows(x), next(iter(per_param.values())).shape[1]
        J = torch.cat([per_param[name].reshape(n, d, -1) for name in selected], dim=2)
        bad = nonfinite_rows(J)
        if bool(bad.any()):
            raise nonfinite_error(model, x, output_fn, t, bad, start)
        yield start, J


def output_jvp(model: nn.Module, inputs: Inputs, tangent: dict[str, Tensor], output_fn: OutputFn | None = None,
               targets: Tensor | None = None, *, params: ParamSpec = None) -> Tensor:
    """J(x) v for every sample of one batch at once: the change of every output along a parameter direction v.

    One forward-mode pass (`torch.func.jvp`) over the batch: no backward pass, no per-sample
    gradient. The rows of J(x) v are the dot products of the per-sample gradients with v.
    Attention runs by its plain operations (`unfused_attention`): the fused kernels
    have no forward-mode rule.

    Args:
        inputs: one batch, `(n, ...)` tensor or a dict of tensors (keyword inputs).
        tangent: {name: tensor} for every selected parameter (the direction v), each of its
            parameter's shape, dtype and device.
        params: the selected parameters (`netsim.params`; default: all trainable).

    Returns:
        `(n, d)`.

    Raises:
        NonFiniteError: samples whose J(x) v is NaN or inf.
    """
    check_model(model)
    check_batch(model, inputs, targets)
    selected = trainable_parameters(model, params)
    if not isinstance(tangent, dict) or set(tangent) != set(selected):
        raise ValueError("the tangent must be a dict giving a direction for every selected parameter (and no other)")
    for name, p in selected.items():
        t = tangent[name]
        if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            raise ValueError(f"tangent[{name!r}] must be a {p.dtype} tensor of shape {tuple(p.shape)} on {p.device}")
    output = _functional_output(model, output_fn, selected)
    primals = {k: v.detach() for k, v in selected.items()}
    with unfused_attention(), model_lock(model):  # fused attention has no forward-mode rule; see `threads`
        jv = torch.func.jvp(lambda p: output(p, inputs, targets), (primals,), ({k: tangent[k] for k in primals},))[1]
    bad = nonfinite_rows(jv)
    if bool(bad.any()):
        raise nonfinite_error(model, inputs, output_fn, targets, bad)
    return jv


def per_sample_grads(
    model: nn.Module,
    inputs,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    targets: Tensor | None = None,
    *,
    params: ParamSpec = None,
    targets_key: str | None = None,
    method: str = "auto",
) -> Tensor:
    """Exact per-sample Jacobians of `output_fn(model(x))` w.r.t. the selected parameters.

    Args:
        model: the network; parameters with `requires_grad=False` are left out.
        inputs: `(N, ...)` tensor, or a Dataset, DataLoader or iterable of batches (`netsim.data`),
            read once.
        output_fn: maps the raw output batch to `(B, d)` (default: the raw output, which must
            be `(B, d)` or `(B,)`; a tuple, dict or dataclass output needs an `output_fn`, which
            receives it unchanged).
        chunk_size: samples per vmap call.
        targets: optional per-sample side information passed to `output_fn`.
        params: the parameters to differentiate against: name patterns (fnmatch, e.g.
            `["head.*"]`) or a callable `(name, parameter) -> bool` (`netsim.params`);
            default every trainable parameter.
        targets_key: the key of the targets in dict batches.
        method: "auto" (the faster engine, measured: `netsim.engine`), "layerwise" (one batched
            forward and d backward passes per chunk, the gradients assembled per layer) or
            "jacobian" (`iter_jacobians`).

    Returns:
        `(N, d, p)` tensor: row `J[n, i]` is the gradient of output i at sample n.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> per_sample_grads(net, torch.randn(5, 3)).shape
        torch.Size([5, 2, 26])
        >>> per_sample_grads(net, torch.randn(5, 3), params=["2.*"]).shape
        torch.Size([5, 2, 10])
    """
    from .engine import check_engine_options  # both build on this module
    from .kernel import engine_chunks, engine_for_data
    from .layerwise import materialise

    check_engine_options(model, method=method, chunk_size=chunk_size, params=params)
    source = as_source(inputs, targets, targets_key=targets_key, name="inputs", device=model_device(model))
    check_data(model, source)
    engine = engine_for_data(model, source, output_fn, chunk_size, method, params)
    selected = trainable_parameters(model, params)
    length = source.length
    out, parts = None, []
    p = sum(t.numel() for t in selected.values())
    for start, rep in engine_chunks(engine, source):
        n, d = engine.shape(rep)
        if length is None:  # unknown length (a generator): the chunks are joined at the end
            parts.append(rep if engine.name == "jacobian" else materialise(rep, selected))
            continue
        if out is None:  # preallocated: concatenating chunks would briefly hold G twice
            first = next(iter(selected.values()))
            out = torch.empty((length, d, p), dtype=first.dtype, device=first.device)
        if engine.name == "jacobian":
            out[start:start + n] = rep
        else:   # the layer-wise blocks written in place: no chunk-sized copy in between
            materialise(rep, selected, out=out[start:start + n])
    return torch.cat(parts) if length is None else out
