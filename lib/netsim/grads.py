"""Per-sample Jacobians of a model's (reduced) output with respect to its parameters.

Everything in netsim starts from J(x) = d output_fn(model(x)) / d theta, a `(d, p)` matrix per
sample: d is the output dimension after `output_fn`, p the number of trainable parameters.
The Jacobians are exact, computed with torch.func (`functional_call` + `vmap` + `jacrev`),
and produced chunk by chunk so that callers that only need sums of them never hold all of
them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .checks import NonFiniteError, as_output_matrix, check_batch, check_model, check_positive_int, nonfinite_rows

OutputFn = Callable[..., Tensor]

#: Default number of samples per vmap call: large enough to amortise Python overhead,
#: small enough that `chunk_size * d * p` floats stay modest for ~1M-parameter models.
DEFAULT_CHUNK = 64


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the kernels differentiate against: those with `requires_grad=True`.

    Raises:
        ValueError: if the model has no trainable parameter.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter (requires_grad=True): "
            "the gradient kernels are defined by parameter gradients, so there is nothing to compare."
        )
    return params


def num_parameters(model: nn.Module) -> int:
    """p, the length of one flattened per-sample gradient."""
    return sum(p.numel() for p in trainable_parameters(model).values())


def output_dim(model: nn.Module, inputs: Tensor, output_fn: OutputFn | None = None,
               targets: Tensor | None = None) -> int:
    """d, the output dimension after `output_fn`, read from a forward pass on one sample
    (after `check_model` and `check_batch`: a refused model is never run)."""
    check_model(model)
    check_batch(model, inputs, targets)
    return reduced_outputs(model, inputs[:1], output_fn, None if targets is None else targets[:1]).shape[1]


def reduced_outputs(model: nn.Module, inputs: Tensor, output_fn: OutputFn | None = None,
                    targets: Tensor | None = None) -> Tensor:
    """`(n, d)` output_fn(model(inputs)) without gradients (the caller has checked the model)."""
    with torch.no_grad():
        out = model(inputs)
        if output_fn is not None:
            out = output_fn(out) if targets is None else output_fn(out, targets)
    return as_output_matrix(out, inputs.shape[0])


def nonfinite_error(model: nn.Module, inputs: Tensor, output_fn: OutputFn | None, targets: Tensor | None,
                    bad: Tensor, offset: int = 0) -> NonFiniteError:
    """The `NonFiniteError` for the samples `bad` (`(n,)` bool over `inputs`) whose gradients are
    non-finite, each blamed on the first stage that is: its input, its output, or its gradient.
    Runs the model on those samples only (no gradients; the model is in eval mode)."""
    rows = torch.nonzero(bad.cpu()).flatten()
    x = inputs[rows.to(inputs.device)]
    in_bad = nonfinite_rows(x).cpu() if x.is_floating_point() else torch.zeros(len(rows), dtype=torch.bool)
    out_bad = torch.zeros_like(in_bad)
    if not bool(in_bad.all()):
        sub = None if targets is None else targets[rows.to(targets.device)]
        out_bad = nonfinite_rows(reduced_outputs(model, x, output_fn, sub)).cpu() & ~in_bad
    grad_bad = ~(in_bad | out_bad)
    return NonFiniteError({stage: (rows[mask] + offset).tolist() for stage, mask in
                           (("inputs", in_bad), ("outputs", out_bad), ("gradients", grad_bad))})


def _functional_output(model: nn.Module, output_fn: OutputFn | None):
    """`output(params, x, t=None) -> (B, d)`: the reduced model output as a function of the
    trainable parameters (frozen parameters and buffers held fixed)."""
    buffers = dict(model.named_buffers())
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}

    def output(params, x, t=None):
        out = functional_call(model, (params, frozen, buffers), (x,))
        if output_fn is not None:
            out = output_fn(out) if t is None else output_fn(out, t)
        return as_output_matrix(out, x.shape[0])

    return output


def _single_sample_jacobian(model: nn.Module, output_fn: OutputFn | None, with_targets: bool):
    """Builds `jac(params, x[, t]) -> {name: (d, *param.shape)}` for one unbatched sample."""
    batch_output = _functional_output(model, output_fn)

    def output(params, x, t=None):
        return batch_output(params, x.unsqueeze(0), None if t is None else t.unsqueeze(0))[0]

    # chunk_size=1: one vjp per output row instead of a vmap over rows. Nested vmaps (rows
    # inside samples) hit broken batching rules, e.g. PReLU after a convolution in torch 2.13;
    # d is small, so the loop costs little.
    if with_targets:
        return jacrev(output, chunk_size=1)
    return jacrev(lambda params, x: output(params, x), chunk_size=1)


def iter_jacobians(
    model: nn.Module,
    inputs: Tensor,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    targets: Tensor | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yields `(start, J)` with `J` of shape `(n_chunk, d, p)` for consecutive input chunks.

    The flattening order of parameters is `model.named_parameters()` order (trainable only),
    the same in every chunk, so chunks can be combined by the caller.

    Args:
        model: any module; BatchNorm/Dropout must be in eval mode.
        inputs: `(N, ...)` batch, on the model's device.
        output_fn: maps the raw output batch to `(B, d)`; called as `output_fn(out)` or, when
            `targets` is given, `output_fn(out, targets_batch)`.
        chunk_size: samples per vmap call (default `DEFAULT_CHUNK`); the last chunk may be shorter.
        targets: optional `(N, ...)` per-sample side information for `output_fn` (class labels).

    Raises:
        NonFiniteError: samples whose Jacobian holds NaN or inf (blamed on their input, output
            or gradient), when their chunk is reached.
    """
    check_model(model)
    check_batch(model, inputs, targets)
    check_positive_int("chunk_size", chunk_size, optional=True)
    params = trainable_parameters(model)
    chunk = chunk_size or DEFAULT_CHUNK
    # jacrev differentiates w.r.t. these detached copies, so no graph reaches the model.
    detached = {n: p.detach() for n, p in params.items()}
    jac = _single_sample_jacobian(model, output_fn, targets is not None)
    batched = vmap(jac, in_dims=(None, 0, 0) if targets is not None else (None, 0))
    for start in range(0, inputs.shape[0], chunk):
        x = inputs[start:start + chunk]
        args = (detached, x) if targets is None else (detached, x, targets[start:start + chunk])
        per_param = batched(*args)
        n, d = x.shape[0], next(iter(per_param.values())).shape[1]
        J = torch.cat([per_param[name].reshape(n, d, -1) for name in params], dim=2)
        bad = nonfinite_rows(J)
        if bool(bad.any()):
            raise nonfinite_error(model, x, output_fn, None if targets is None else args[2], bad, start)
        yield start, J


def output_jvp(model: nn.Module, inputs: Tensor, tangent: dict[str, Tensor], output_fn: OutputFn | None = None,
               targets: Tensor | None = None) -> Tensor:
    """J(x) v for every sample at once: the change of every output along a parameter direction v.

    One forward-mode pass (`torch.func.jvp`) over the batch: no backward pass, no per-sample
    gradient. The rows of J(x) v are the dot products of the per-sample gradients with v.

    Args:
        tangent: {name: tensor} for every trainable parameter (the direction v), each of its
            parameter's shape, dtype and device.

    Returns:
        `(n, d)`.

    Raises:
        NonFiniteError: samples whose J(x) v is NaN or inf.
    """
    check_model(model)
    check_batch(model, inputs, targets)
    params = trainable_parameters(model)
    if not isinstance(tangent, dict) or set(tangent) != set(params):
        raise ValueError("the tangent must be a dict giving a direction for every trainable parameter (and no other)")
    for name, p in params.items():
        t = tangent[name]
        if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            raise ValueError(f"tangent[{name!r}] must be a {p.dtype} tensor of shape {tuple(p.shape)} on {p.device}")
    output = _functional_output(model, output_fn)
    primals = {k: v.detach() for k, v in params.items()}
    jv = torch.func.jvp(lambda p: output(p, inputs, targets), (primals,), ({k: tangent[k] for k in primals},))[1]
    bad = nonfinite_rows(jv)
    if bool(bad.any()):
        raise nonfinite_error(model, inputs, output_fn, targets, bad)
    return jv


def per_sample_grads(
    model: nn.Module,
    inputs: Tensor,
    output_fn: OutputFn | None = None,
    chunk_size: int | None = None,
    targets: Tensor | None = None,
) -> Tensor:
    """Exact per-sample Jacobians of `output_fn(model(x))` w.r.t. all trainable parameters.

    Args:
        model: the network; parameters with `requires_grad=False` are left out.
        inputs: `(N, ...)` batch.
        output_fn: maps the raw output batch to `(B, d)` (default: the raw output, which must
            be `(B, d)` or `(B,)`).
        chunk_size: samples per vmap call.
        targets: optional per-sample side information passed to `output_fn`.

    Returns:
        `(N, d, p)` tensor: row `J[n, i]` is the gradient of output i at sample n.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> per_sample_grads(net, torch.randn(5, 3)).shape
        torch.Size([5, 2, 26])
    """
    out = None
    for start, J in iter_jacobians(model, inputs, output_fn, chunk_size, targets):
        if out is None:  # preallocated: concatenating chunks would briefly hold G twice
            out = J.new_empty((inputs.shape[0], *J.shape[1:]))
        out[start:start + J.shape[0]] = J
    return out
