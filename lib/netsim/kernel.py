"""The paper's gradient kernels k^I, k^N, k^C, their d x d matrices, and their reductions.

With J(x) the `(d, p)` Jacobian of the output w.r.t. the parameters and
K(x, x') = J(x) J(x')^T (a d x d matrix; the paper's Theorem 3):

- inner (k^I, Eq. 1):        K(x, x')
- influence (k^N, Thm. 3):   K(x', x) K(x, x)^-1  -- how a move v of f(x) moves f(x'):
                             f(x') moves by eps K(x', x) K(x, x)^-1 v. Asymmetric.
- correlation (k^C, Eq. 4):  K(x, x)^-1/2 K(x, x') K(x', x')^-1/2. The paper prints
                             K(x', x)^-1/2 on the right: a typo, the symmetric unitless kernel
                             needs the second input's self-kernel there.

Reductions, applied the same way to every kind:

- "trace": Tr(M) / n, the paper's Eq. (5) with n = d when the self-kernels are full rank;
  in general n = d (inner), rank K(x, x) (influence), sqrt(rank K(x, x) rank K(x', x'))
  (correlation), which keeps k^C(x, x) = 1 and |k^C| <= 1 when K(x, x) is singular.
- "rot" (d = 2): the rotation-invariant kernel max_R Tr(R M) / n over 2-D rotations R, which
  equals the paper's 1/2 sqrt(||M||_F^2 + 2 det M) for n = 2 (as (a+d)^2 + (b-c)^2 =
  ||M||_F^2 + 2 det M for M = [[a, b], [c, d]], it is never the square root of a negative).
- "none": the d x d matrices themselves, `(N, M, d, d)`.

Singular self-kernels: a classifier's -log p outputs have Jacobians with a left null vector
(sum_c p_c grad log p_c = 0), so K(x, x) has rank <= d - 1. Inverse (square) roots are taken
on the range of K(x, x) (eigenvalues above `rtol * largest` are kept), i.e. pseudo-inverses.
A sample whose gradient is zero has no direction at all: that is an error, unless the caller
opts in to `on_zero="zero"`, which gives it similarity 0 to everything. NaN or infinite
gradients are a different error (`NonFiniteError`), whatever `on_zero` says.

Exact edges: k^C is clamped to [-1, 1] (Cauchy-Schwarz; rounding can exceed it by an ulp),
and in a symmetric call (`ys=None`) k^C(x, x) is exactly 1 for "trace" and "rot", and exactly
the identity for "none" when K(x, x) has full rank.

Scale: k^C and k^N do not change when the outputs are multiplied by a constant. Self-kernels
that would overflow or lose precision to underflow (outputs scaled by ~1e+-15 and beyond in
float32) are computed from Jacobians divided per sample by a power of two, which is exact; in
the ordinary range nothing is rescaled and the results are bit for bit those of the plain formulas.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import chain, groupby

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import (
    NonFiniteError,
    check_choice,
    check_data,
    check_model,
    check_rtol,
    model_device,
    nonfinite_rows,
)
from .data import Source, TensorSource, as_source
from .distributed import gather_rows, rank0_choice, shard
from .engine import AUTO_PROBE_SAMPLES, METHODS, JacobianEngine, check_engine_options, engine_for
from .grads import OutputFn, output_dim, trainable_parameters
from .memory import budget_bytes
from .params import ParamSpec

KINDS = ("inner", "influence", "correlation")
REDUCTIONS = ("trace", "rot", "none")
ON_ZERO = ("raise", "zero")

def block_rows(engine, d: int, itemsize: int, budget: int) -> int:
    """Rows per block of `similarity` (at least one chunk): the block's prepared Jacobians fill at
    most half of `budget`, its kernel block with the temporaries of its gram and reduction (rows x
    rows on the diagonal, 4 values of d x d per pair) the other half."""
    half = budget // 2
    square = int(math.sqrt(half / (4 * d * d * itemsize)))
    return max(engine.chunk, min(half // max(engine.bytes_per_sample(d, itemsize), 1), square))


class ZeroGradientError(ValueError):
    """Some samples have an identically zero gradient: their normalised kernel is undefined."""

    def __init__(self, indices: list[int]):
        self.indices = indices
        shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
        super().__init__(
            f"{len(indices)} sample(s) have a zero gradient (indices {shown}): a zero gradient has no "
            "direction, so the normalised kernels k^N and k^C are undefined for them. Typical cause: "
            "every ReLU path to the output is inactive. Pass on_zero='zero' to give them similarity 0."
        )


def default_rtol(dtype: torch.dtype, d: int) -> float:
    """Relative eigenvalue cut-off that separates a numerically zero eigenvalue of J J^T."""
    return 100.0 * d * torch.finfo(dtype).eps


def _scaled_self_gram(rep, engine) -> tuple[object, Tensor, Tensor | None]:
    """`(rep', K', inv)`: the self-kernels K' = J' J'^T of J' = inv J, where `inv` `(n,)` holds
    powers of two (exact scaling) for the samples whose K(x, x) would overflow or underflow,
    ones elsewhere; `rep' = rep`, `K' = K` and `inv = None` when no sample needs it (the
    ordinary case: no extra work, no change in the numbers)."""
    k_self = engine.self_gram(rep)
    trace = k_self.diagonal(dim1=-2, dim2=-1).sum(-1)
    finfo = torch.finfo(k_self.dtype)
    # Products of entries below sqrt(tiny / eps^2) lose digits to subnormals (or vanish: a zero
    # trace may hide a tiny non-zero gradient); inf is overflow.
    outside = ~torch.isfinite(trace) | (trace < finfo.tiny / finfo.eps ** 2)
    if not bool(outside.any()):
        return rep, k_self, None
    largest = engine.max_abs(rep).double()
    outside &= largest > 0          # true zero gradients stay as they are
    if not bool(outside.any()):
        return rep, k_self, None
    exponent = torch.where(outside, torch.floor(torch.log2(largest)), torch.zeros_like(largest))
    inv = torch.exp2(-exponent).to(k_self.dtype)
    n, d = k_self.shape[:2]
    scaled = engine.transform(rep, torch.diag_embed(inv[:, None].expand(n, d)))
    return scaled, engine.self_gram(scaled), inv


def psd_power(k_self: Tensor, power: float, rtol: float | None = None) -> tuple[Tensor, Tensor]:
    """Powers of symmetric PSD matrices restricted to their range (pseudo-inverse powers).

    Args:
        k_self: `(n, d, d)` self-kernels K(x, x).
        power: e.g. -0.5 for the inverse square root, -1 for the pseudo-inverse.
        rtol: eigenvalues <= rtol * largest eigenvalue count as zero
            (default `default_rtol(dtype, d)`).

    Returns:
        `(n, d, d)` matrices in k_self's dtype, and `(n,)` integer ranks (0 for a zero matrix,
        whose power is then the zero matrix).
    """
    d = k_self.shape[-1]
    rtol = default_rtol(k_self.dtype, d) if rtol is None else rtol
    # d x d eigenproblems are cheap: solve them in float64 whatever the gradients' precision.
    evals, evecs = torch.linalg.eigh(k_self.double())
    largest = evals[..., -1:].clamp_min(0.0)
    keep = (evals > rtol * largest) & (largest > torch.finfo(k_self.dtype).tiny)
    scaled = torch.where(keep, evals.clamp_min(torch.finfo(torch.float64).tiny) ** power,
                         torch.zeros_like(evals))
    out = (evecs * scaled.unsqueeze(-2)) @ evecs.transpose(-1, -2)
    return out.to(k_self.dtype), keep.sum(-1)


def _normalisation(rep, kind: str, rtol: float | None, on_zero: str, offset: int, engine):
    """`(rep', factor', rank, inv)` from `_scaled_self_gram`: factor' is K'^-1/2 (correlation) or
    K'^+ (influence) of the (possibly rescaled) Jacobians rep'; rank `(n,)` is rank K(x, x)."""
    rep, k_self, inv = _scaled_self_gram(rep, engine)
    factor, rank = psd_power(k_self, -0.5 if kind == "correlation" else -1.0, rtol)
    if on_zero == "raise" and bool((rank == 0).any()):
        raise ZeroGradientError((torch.nonzero(rank == 0).flatten() + offset).tolist())
    return rep, factor, rank, inv


def left_factor(rep, kind: str, rtol: float | None, on_zero: str, offset: int,
                engine=JacobianEngine) -> tuple[Tensor | None, Tensor]:
    """The normalisation of one side's Jacobians, as a left factor of the unscaled Jacobians.

    Returns `(factor, rank)`: factor `(n, d, d)` is K(x,x)^-1/2 (correlation) or K(x,x)^+
    (influence), None for inner (no normalisation); rank `(n,)` is rank K(x, x) (d for inner).

    Raises:
        ZeroGradientError: samples with a zero gradient, unless `on_zero="zero"`.
    """
    if kind == "inner":
        n, d = engine.shape(rep)
        return None, torch.full((n,), d)
    _, factor, rank, inv = _normalisation(rep, kind, rtol, on_zero, offset, engine)
    if inv is not None:  # K(x,x)^p = s^(2p) K'^p with s = 1 / inv
        factor = factor * (inv if kind == "correlation" else inv * inv)[:, None, None]
    return factor, rank


def _prepare(rep, kind: str, rtol: float | None, on_zero: str, offset: int,
             engine=JacobianEngine) -> tuple[object, Tensor]:
    """`(Q, rank)`: Q = K(x,x)^-1/2 J (correlation), K(x,x)^+ J (influence) or J (inner), in the
    engine's representation (`(n, d, p)` by default); see `left_factor`. Rescaled samples are
    normalised from their rescaled Jacobians (Q is unchanged by the scale for correlation and
    shrinks by it for influence), so no factor leaves the floating-point range."""
    if kind == "inner":
        return rep, left_factor(rep, kind, rtol, on_zero, offset, engine)[1]
    rep, factor, rank, inv = _normalisation(rep, kind, rtol, on_zero, offset, engine)
    if inv is not None and kind == "influence":
        factor = factor * inv[:, None, None]
    return engine.transform(rep, factor), rank


def kernel_block(Qx, Qy, kind: str, reduce: str, engine=JacobianEngine) -> Tensor:
    """`(bx, by)` reduced or `(bx, by, d, d)` full kernel block between prepared chunks.

    For "trace" the d x d blocks are never formed: Tr(A B^T) is a flattened dot product.
    """
    if reduce == "trace":
        return engine.gram(Qx, Qy, trace=True)
    gram = engine.gram(Qx, Qy, trace=False)           # [i, j, a, b] = Qx_i^a . Qy_j^b
    if kind == "influence":
        # K(y, x) K(x, x)^+ = J_y (K(x, x)^+ J_x)^T: rows index y's outputs, columns x's.
        return gram.transpose(-1, -2)
    return gram


def reduce_block(block: Tensor, kind: str, reduce: str, rank_x: Tensor, rank_y: Tensor) -> Tensor:
    """Applies a reduction to a `(bx, by)` trace block or a `(bx, by, d, d)` matrix block."""
    if reduce == "none":
        return block
    if reduce == "rot":
        # max over rotations R of Tr(R M) = sqrt((a + d)^2 + (b - c)^2) for M = [[a, b], [c, d]]
        block = torch.sqrt((block[..., 0, 0] + block[..., 1, 1]) ** 2
                           + (block[..., 0, 1] - block[..., 1, 0]) ** 2)
    rows, cols = trace_divisor(kind, rank_x, "rows"), trace_divisor(kind, rank_y, "columns")
    # In place, without a (rows, columns) temporary: the block is the largest thing a call holds.
    # A zero divisor only occurs for samples given similarity 0 by on_zero="zero".
    if bool((rows == rows[0]).all()) and bool((cols == cols[0]).all()):   # one divisor: the usual case
        norm = float(rows[0] * cols[0])
        block = block.div_(norm) if norm > 0 else block.zero_()
    else:
        for start in range(0, block.shape[0], _REDUCE_ROWS):
            part = block[start:start + _REDUCE_ROWS]
            norm = (rows[start:start + _REDUCE_ROWS].unsqueeze(1) * cols.unsqueeze(0)).to(part)  # ranks: on the CPU
            part.copy_(torch.where(norm > 0, part / norm.clamp_min(1), torch.zeros_like(part)))
    return block.clamp_(-1.0, 1.0) if kind == "correlation" else block


#: Rows of a block divided at a time by `reduce_block` when the samples' divisors differ.
_REDUCE_ROWS = 256


def trace_divisor(kind: str, rank: Tensor, side: str) -> Tensor:
    """`(n,)` float64 per-sample factors of the reductions' divisor n(x, x') = div_rows(x) div_columns(x'):
    d for inner (rank is d there) and rank K(x, x) for influence, both on the rows' side, and
    sqrt(rank K(x, x) rank K(x', x')) for correlation (Cauchy-Schwarz keeps |k^C| <= 1)."""
    rank = rank.double()
    if kind == "correlation":
        return rank.sqrt()
    return rank if side == "rows" else torch.ones_like(rank)


def _exact_self(block: Tensor, kind: str, reduce: str, rank: Tensor) -> Tensor:
    """Sets k^C(x, x) on the diagonal of a symmetric diagonal block to its exact value: 1 for
    the reductions, the identity for "none" where K(x, x) has full rank (in place)."""
    if kind != "correlation":
        return block
    idx = torch.arange(block.shape[0], device=block.device)
    rank = rank.to(block.device)
    if reduce == "none":
        d = block.shape[-1]
        full = rank == d
        block[idx[full], idx[full]] = torch.eye(d, dtype=block.dtype, device=block.device)
    else:
        block[idx, idx] = (rank > 0).to(block.dtype)
    return block


def _validate(kind: str, reduce: str, on_zero: str, d: int | None = None) -> None:
    check_choice("kind", kind, KINDS)
    check_choice("reduce", reduce, REDUCTIONS)
    check_choice("on_zero", on_zero, ON_ZERO)
    if reduce == "rot" and d is not None and d != 2:
        raise ValueError(f"reduce='rot' is the rotation-invariant kernel of 2-D outputs; here d = {d}")


def prepare_columns(rep, kind: str, rtol, on_zero, offset: int, engine=JacobianEngine) -> tuple[object, Tensor]:
    """The column side: influence only normalises by the row input x, so J_y stays raw
    (a point with zero gradient is simply not moved by anything)."""
    if kind == "influence":
        return rep, torch.ones(engine.shape(rep)[0])
    return _prepare(rep, kind, rtol, on_zero, offset, engine)


def similarity_from_jacobians(
    Jx: Tensor,
    Jy: Tensor | None = None,
    *,
    kind: str = "correlation",
    reduce: str = "trace",
    rtol: float | None = None,
    on_zero: str = "raise",
) -> Tensor:
    """Kernel between two sets of precomputed Jacobians (the dense path: small N only).

    Args:
        Jx: `(N, d, p)` Jacobians of the first inputs (from `per_sample_grads`).
        Jy: `(M, d, p)` Jacobians of the second inputs; None means Jx.
        kind, reduce, rtol, on_zero: as in `similarity`.

    Returns:
        `(N, M)` for reduce "trace"/"rot", `(N, M, d, d)` for "none".
    """
    for name, J in (("Jx", Jx), ("Jy", Jy)):
        if J is not None and not isinstance(J, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (N, d, p), got {type(J).__name__}")
    if Jx.ndim != 3 or (Jy is not None and (Jy.ndim != 3 or Jy.shape[1:] != Jx.shape[1:])):
        raise ValueError("Jacobians must be (N, d, p) with matching d and p")
    if Jx.shape[0] == 0 or (Jy is not None and Jy.shape[0] == 0):
        raise ValueError("Jacobians must hold at least one sample")
    _validate(kind, reduce, on_zero, Jx.shape[1])
    check_rtol(rtol)
    for name, J in (("Jx", Jx), ("Jy", Jy)):
        bad = None if J is None else nonfinite_rows(J)
        if bad is not None and bool(bad.any()):
            raise NonFiniteError({f"gradients ({name})": torch.nonzero(bad).flatten().tolist()})
    Qx, rank_x = _prepare(Jx, kind, rtol, on_zero, 0)
    Qy, rank_y = prepare_columns(Jx if Jy is None else Jy, kind, rtol, on_zero, 0)
    out = reduce_block(kernel_block(Qx, Qy, kind, reduce), kind, reduce, rank_x, rank_y)
    return _exact_self(out, kind, reduce, rank_x) if Jy is None else out


def prepare_rows(chunks, engine, kind: str, rtol, on_zero: str, offset: int, rows: int | None = None
                 ) -> tuple[object, Tensor]:
    """Prepared Jacobians of a row block, normalised chunk by chunk; all zero-gradient samples
    of the block are named at once. Given the block's `rows` (an upper bound), each chunk is
    written into a block allocated once and dropped: the block is never held twice, as the
    concatenation of its chunks would be."""
    reps, ranks, block, filled = [], [], None, 0
    for start, rep in chunks:
        Q, rank = _prepare(rep, kind, rtol, "zero", start, engine)
        ranks.append(rank)
        if rows is None:
            reps.append(Q)
            continue
        if block is None:
            block = engine.map(Q, lambda t: t.new_empty((rows, *t.shape[1:])))
        n = engine.size(Q)
        for whole, part in zip(engine.tensors(block), engine.tensors(Q)):
            whole[filled:filled + n] = part
        filled += n
        del Q
    rank = torch.cat(ranks)
    if on_zero == "raise" and kind != "inner" and bool((rank == 0).any()):
        raise ZeroGradientError((torch.nonzero(rank == 0).flatten() + offset).tolist())
    if rows is None:
        return engine.cat(reps), rank
    return (block if filled == rows else engine.map(block, lambda t: t[:filled])), rank


def _transpose_block(block: Tensor, reduce: str) -> Tensor:
    """k(y, x) from k(x, y) for the symmetric kinds: K^C(x', x) = K^C(x, x')^T."""
    block = block.transpose(0, 1)
    return block.transpose(-1, -2) if reduce == "none" else block


def engine_for_data(model: nn.Module, source: Source, output_fn: OutputFn | None, chunk_size: int | None,
                    method: str, params: ParamSpec = None, *, measure: bool = True):
    """`engine.engine_for` probed on `source`: the whole tensor for a tensor (as `engine_for` is
    called on tensors), else its first `AUTO_PROBE_SAMPLES` samples."""
    if isinstance(source, TensorSource):
        inputs, targets = source.data, source.targets
    else:
        inputs, targets = source.first(AUTO_PROBE_SAMPLES)
    return engine_for(model, inputs, output_fn, targets, chunk_size, method, params=params, measure=measure)


def data_output_dim(model: nn.Module, source: Source, output_fn: OutputFn | None) -> int:
    """d, read from a forward pass on the first sample of `source`."""
    inputs, targets = source.first()
    return output_dim(model, inputs, output_fn, targets)


def engine_chunks(engine, source: Source, start: int = 0, stop: int | None = None, *, block: int | None = None
                  ) -> Iterator[tuple[int, object]]:
    """`(offset, representation)` of `engine` for the samples `[start, stop)` of `source`, in the
    engine's chunks (see `Source.chunks` for `block`): one pass over the data."""
    for offset, inputs, targets in source.chunks(engine.chunk, start, stop, block=block):
        try:
            for s, rep in engine.chunks(inputs, targets):
                yield offset + s, rep
        except NonFiniteError as error:
            raise error.shifted(offset) from None


def similarity_sources(model: nn.Module, xs, ys, x_targets, y_targets, targets_key: str | None):
    """The `Source`s of `similarity`'s data (ys None when it is xs)."""
    check_model(model)
    device = model_device(model)
    source_x = as_source(xs, x_targets, targets_key=targets_key, name="xs", targets_name="x_targets", device=device)
    if ys is None:
        if y_targets is not None:
            raise ValueError("y_targets was given without ys: pass x_targets alone when ys is None")
        return source_x, None
    return source_x, as_source(ys, y_targets, targets_key=targets_key, name="ys", targets_name="y_targets",
                               device=device)


def check_similarity_call(model: nn.Module, xs, ys, *, kind: str, reduce: str,
                          x_targets: Tensor | None, y_targets: Tensor | None, chunk_size: int | None,
                          memory_budget: int, rtol: float | None, on_zero: str, method: str,
                          params: ParamSpec = None, targets_key: str | None = None) -> tuple[Source, Source | None]:
    """Every check of `similarity`'s arguments that needs no forward pass (the model is not run).
    Returns the data as `Source`s (ys: None when it is xs)."""
    _validate(kind, reduce, on_zero)
    check_engine_options(model, method=method, chunk_size=chunk_size, params=params, rtol=rtol,
                         memory_budget=memory_budget)
    source_x, source_y = similarity_sources(model, xs, ys, x_targets, y_targets, targets_key)
    check_data(model, source_x)
    if source_y is not None:
        check_data(model, source_y)
        source_y.require_passes(2, "similarity (once per row block)")
    else:
        source_x.require_passes(2, "similarity with ys=None (rows, then columns once per row block)")
    return source_x, source_y


def similarity_blocks(
    model: nn.Module,
    xs,
    ys=None,
    *,
    kind: str = "correlation",
    reduce: str = "trace",
    output_fn: OutputFn | None = None,
    x_targets: Tensor | None = None,
    y_targets: Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    rtol: float | None = None,
    on_zero: str = "raise",
    method: str = "auto",
    progress: bool = False,
    params: ParamSpec = None,
    targets_key: str | None = None,
) -> Iterator[tuple[slice, slice, Tensor, bool]]:
    """The blocks of `similarity`, one at a time: for consumers that reduce the kernel on the fly
    (neighbour counts) and never hold the `(N, M)` matrix.

    Arguments as in `similarity` (checked at once, before the model runs). Yields
    `(rows, cols, block, mirrored)`: `block` is k(xs[rows], ys[cols]), `(b, c)` or `(b, c, d, d)`.
    In a symmetric call (`ys=None`, kind not "influence") only the upper block triangle is
    computed: `mirrored` blocks also stand for their transposes at `(cols, rows)`. Every entry
    of the matrix is covered exactly once. Memory: one row block of Jacobians and one block,
    within `memory_budget` and, for data of known length, within the `(N, M)` matrix's own size
    (a stream never holds more than the matrix it avoids). Passes over the data as in `similarity`.
    """
    return _checked_blocks(model, xs, ys, kind=kind, reduce=reduce, output_fn=output_fn, x_targets=x_targets,
                           y_targets=y_targets, chunk_size=chunk_size, memory_budget=memory_budget, rtol=rtol,
                           on_zero=on_zero, method=method, progress=progress, params=params, targets_key=targets_key,
                           streamed=True)


def _checked_blocks(model, xs, ys, *, kind, reduce, output_fn, x_targets, y_targets, chunk_size, memory_budget, rtol,
                    on_zero, method, progress, params, targets_key, streamed: bool):
    source_x, source_y = check_similarity_call(
        model, xs, ys, kind=kind, reduce=reduce, x_targets=x_targets, y_targets=y_targets, chunk_size=chunk_size,
        memory_budget=memory_budget, rtol=rtol, on_zero=on_zero, method=method, params=params,
        targets_key=targets_key)
    d = data_output_dim(model, source_x, output_fn)
    _validate(kind, reduce, on_zero, d)
    return _blocks(model, source_x, source_y, kind, reduce, output_fn, chunk_size, memory_budget,
                   rtol, on_zero, method, progress, d, params, streamed)


def _blocks(model, source_x: Source, source_y: Source | None, kind, reduce, output_fn, chunk_size, memory_budget,
            rtol, on_zero, method, progress, d, params, streamed: bool):
    symmetric = source_y is None and kind != "influence"
    if source_y is None:
        source_y = source_x
    engine = engine_for_data(model, source_x, output_fn, chunk_size, method, params)
    n, m = source_x.length, source_y.length
    first = next(iter(trainable_parameters(model, params).values()))
    budget = budget_bytes(memory_budget)
    if streamed and n is not None and m is not None:   # never more than the (N, M) matrix it streams
        budget = min(budget, n * m * (1 if reduce != "none" else d * d) * first.element_size())
    rows_per_block = block_rows(engine, d, first.element_size(), budget)
    total = None
    if n is not None and m is not None:
        n_blocks = math.ceil(n / rows_per_block)
        total = n + sum(m - (b * rows_per_block if symmetric else 0) for b in range(n_blocks))
    bar = tqdm(total=total, desc=f"k^{kind}", unit="sample", disable=not progress)

    def counted(chunks):
        for start, rep in chunks:
            bar.update(engine.size(rep))
            yield start, rep

    try:  # one pass over xs for the rows; the columns stream by once per row block
        row_chunks = engine_chunks(engine, source_x, block=rows_per_block)
        for _, group in groupby(counted(row_chunks), key=lambda chunk: chunk[0] // rows_per_block):
            head = next(group)
            r0 = head[0]
            Qx = None    # the previous row block is dropped before this one is prepared
            rows = None if n is None else min(rows_per_block, n - r0)
            Qx, rank_x = prepare_rows(chain([head], group), engine, kind, rtol, on_zero, r0, rows)  # noqa: B031
            r1 = r0 + engine.size(Qx)
            c_start = r0 if symmetric else 0
            if symmetric:  # the diagonal block reuses this block's own Jacobians
                block = reduce_block(kernel_block(Qx, Qx, kind, reduce, engine), kind, reduce, rank_x, rank_x)
                bar.update(r1 - r0)
                yield slice(r0, r1), slice(r0, r1), _exact_self(block, kind, reduce, rank_x), False
                c_start = r1
            if m is not None and c_start >= m:
                continue
            for c0, rep_y in counted(engine_chunks(engine, source_y, c_start)):
                c1 = c0 + engine.size(rep_y)
                Qy, rank_y = prepare_columns(rep_y, kind, rtol, on_zero, c0, engine)
                block = reduce_block(kernel_block(Qx, Qy, kind, reduce, engine), kind, reduce, rank_x, rank_y)
                yield slice(r0, r1), slice(c0, c1), block, symmetric
    finally:
        bar.close()


def similarity(
    model: nn.Module,
    xs,
    ys=None,
    *,
    kind: str = "correlation",
    reduce: str = "trace",
    output_fn: OutputFn | None = None,
    x_targets: Tensor | None = None,
    y_targets: Tensor | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    rtol: float | None = None,
    on_zero: str = "raise",
    method: str = "auto",
    progress: bool = False,
    process_group=None,
    params: ParamSpec = None,
    targets_key: str | None = None,
) -> Tensor:
    """The similarity k(x, y) of every x in `xs` to every y in `ys`, streamed in blocks.

    Rows are processed in blocks whose Jacobian representation and kernel blocks fit in
    `memory_budget`; for each block the columns stream by in chunks of `chunk_size` samples. Memory
    is therefore O(memory_budget + chunk + N M d^2) whatever N and M: the `(N + M, d, p)` gradient matrix
    is never held. The price is recomputing the columns' Jacobians once per row block. With the
    layer-wise engine a sample costs O(sum of layer widths) instead of O(p), so row blocks are
    large and Linear-layer blocks cost O(n m (in + out)) instead of O(n m in out). When `ys` is
    None and the kind is symmetric, only the upper block triangle is computed and mirrored
    (`similarity_blocks` gives the blocks one by one).

    Data and passes: `xs` and `ys` may be tensors, Datasets, DataLoaders or iterables of batches
    (`netsim.data`; tuple batches carry the targets, dict batches are keyword inputs with the
    targets under `targets_key`). `xs` is read once for the row blocks (plus one sample first
    for the output dimension); `ys` is read once per row block, its Jacobians recomputed each
    time (never cached), so it must be re-iterable. With `ys=None`, `xs` is also the columns:
    one more pass per row block, which skips (reads without computing) the samples before the
    block. A one-shot generator is refused where it would be needed twice.

    Every argument is checked before the model runs (a refused call leaves it untouched); data
    other than tensors is checked chunk by chunk as it is read.

    Args:
        model: the trained network (BatchNorm/Dropout in eval mode, float32 or float64).
        xs: `(N, ...)` inputs; ys: `(M, ...)` inputs, None for `ys = xs`.
        kind: "inner" (k^I), "influence" (k^N: entry [i, j] is the influence of x_i on y_j,
            K(y_j, x_i) K(x_i, x_i)^-1 as a matrix), or "correlation" (k^C).
        reduce: "trace", "rot" (d = 2 only) or "none" (the d x d matrices).
        output_fn: maps the raw output batch to `(B, d)` (see `per_sample_grads`).
        x_targets, y_targets: per-sample side information for `output_fn` (class labels), one
            row per sample of xs / ys (or carried by the batches).
        chunk_size: samples per Jacobian evaluation (a positive int; None: the engine's default).
        memory_budget: bytes the call may hold beyond the model, one chunk and the result: a row
            block's Jacobians and its kernel blocks (a non-negative int; None: `budget_bytes()`, the
            environment variable NETSIM_MEMORY_BUDGET or 1 GiB). Each further row block costs one
            more pass over the columns.
        rtol: relative eigenvalue cut-off for the (pseudo-)inverse roots of K(x, x), in [0, 1).
        on_zero: "raise" (default) on samples with a zero gradient; "zero" gives them
            similarity 0 (not meaningful for "inner", which needs no normalisation).
        method: "auto" (per-layer rules when the model allows, see `netsim.engine`),
            "layerwise" or "jacobian" (full per-sample Jacobians: any model; keyword inputs).
        progress: show a tqdm bar over the column evaluations.
        process_group: a `torch.distributed` group: every rank passes the same inputs, computes
            the rows of its shard of `xs` and returns the full matrix (rows all-gathered); `xs`
            must have a known length (a tensor, Dataset or DataLoader over a Dataset).
        params: the parameters whose gradients define the kernel: name patterns (fnmatch, e.g.
            `["head.*"]`) or a callable `(name, parameter) -> bool` (`netsim.params`); default
            every trainable parameter. Equal to freezing the others, without touching the model.
        targets_key: the key of the targets in dict batches.

    Returns:
        `(N, M)` tensor for "trace"/"rot"; `(N, M, d, d)` for "none".

    Raises:
        ZeroGradientError: samples with a zero gradient (kinds "correlation", "influence"),
            unless `on_zero="zero"`.
        NonFiniteError: samples with NaN or infinite inputs, outputs or gradients.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> k = similarity(net, torch.randn(6, 2))
        >>> k.shape, bool((k.diagonal() == 1).all())
        (torch.Size([6, 6]), True)
    """
    options = dict(kind=kind, reduce=reduce, output_fn=output_fn, chunk_size=chunk_size,
                   memory_budget=memory_budget, rtol=rtol, on_zero=on_zero, method=method, progress=progress,
                   params=params)
    source_x, source_y = check_similarity_call(
        model, xs, ys, kind=kind, reduce=reduce, x_targets=x_targets, y_targets=y_targets, chunk_size=chunk_size,
        memory_budget=memory_budget, rtol=rtol, on_zero=on_zero, method=method, params=params,
        targets_key=targets_key)
    if process_group is not None:
        return _sharded_similarity(model, source_x, source_y, process_group, options)
    n, m = source_x.length, (source_x if source_y is None else source_y).length
    out, held = None, []
    for rows, cols, block, mirrored in _checked_blocks(model, source_x, source_y, x_targets=None, y_targets=None,
                                                       targets_key=None, streamed=False, **options):
        if n is None or m is None:  # unknown lengths (generators): assembled once all blocks are in
            held.append((rows, cols, block, mirrored))
            continue
        if out is None:
            out = block.new_empty((n, m, *block.shape[2:]))
        place_block(out, rows, cols, block, mirrored, reduce)
    if held:
        n, m = max(r.stop for r, _, _, _ in held), max(c.stop for _, c, _, _ in held)
        out = held[0][2].new_empty((n, m, *held[0][2].shape[2:]))
        for rows, cols, block, mirrored in held:
            place_block(out, rows, cols, block, mirrored, reduce)
    return out


def place_block(out: Tensor, rows: slice, cols: slice, block: Tensor, mirrored: bool, reduce: str) -> None:
    out[rows, cols] = block
    if mirrored:
        out[cols, rows] = _transpose_block(block, reduce)


def shared_method(model, source: Source, output_fn, chunk_size, method: str, params, group,
                  choose=None) -> str:
    """The engine every rank of `group` uses: `method`, or for "auto" the one rank 0 measured
    (each rank timing its own could pick differently, and then their partial sums differ);
    `choose` (default `engine_for_data`) picks it."""
    if method != "auto":
        return method
    name = (choose or engine_for_data)(model, source, output_fn, chunk_size, method, params).name
    return rank0_choice(name, METHODS[1:], group, model_device(model))   # the engines, without "auto"


def _sharded_similarity(model, source_x: Source, source_y: Source | None, group, options) -> Tensor:
    """This rank's rows of the similarity, all-gathered into the full matrix on every rank."""
    if source_x.length is None or (source_y is not None and source_y.length is None):
        raise ValueError("process_group needs data of known length (a tensor, a Dataset or a DataLoader over one)")
    options = dict(options, method=shared_method(model, source_x, options["output_fn"], options["chunk_size"],
                                                 options["method"], options["params"], group))
    n = source_x.length
    if source_y is None:
        source_y = source_x
    rows = shard(n, group)
    if rows.start < rows.stop:
        local = similarity(model, source_x.rows(rows.start, rows.stop), source_y, **options)
    else:  # no rows here, but the rank still joins the all_gather
        d = data_output_dim(model, source_x, options["output_fn"])
        first = next(iter(trainable_parameters(model, options["params"]).values()))
        shape = (0, source_y.length) if options["reduce"] != "none" else (0, source_y.length, d, d)
        local = torch.zeros(shape, dtype=first.dtype, device=first.device)
    return gather_rows(local, n, group)


def remove_shared_direction(J: Tensor) -> Tensor:
    """Projects out of every gradient the direction all gradients share.

    The shared direction of output row a is m_a / ||m_a||, m_a the mean of the normalised
    gradients J[:, a] / ||J[:, a]||. Kernels of the projected Jacobians measure similarity
    beyond what every input has in common (a common component adds a positive floor to every
    k^C, which inflates the soft count N_S by about N times that floor).

    Args:
        J: `(N, d, p)` Jacobians (every row non-zero).

    Returns:
        `(N, d, p)` projected Jacobians, each row orthogonal to its output's shared direction.
    """
    norms = J.norm(dim=2, keepdim=True)
    if bool((norms == 0).any()):
        raise ZeroGradientError(torch.nonzero((norms == 0).any(1).flatten()).flatten().tolist())
    shared = (J / norms).mean(0)
    shared = shared / shared.norm(dim=1, keepdim=True)
    return J - (J * shared).sum(2, keepdim=True) * shared
