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
opts in to `on_zero="zero"`, which gives it similarity 0 to everything.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .distributed import gather_rows, shard
from .engine import JacobianEngine, engine_for
from .grads import OutputFn, output_dim, trainable_parameters

KINDS = ("inner", "influence", "correlation")
REDUCTIONS = ("trace", "rot", "none")
ON_ZERO = ("raise", "zero")

#: Bytes of Jacobians held for one block of rows in `similarity` (the columns stream by).
DEFAULT_BLOCK_BYTES = 512 * 2**20


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


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def default_rtol(dtype: torch.dtype, d: int) -> float:
    """Relative eigenvalue cut-off that separates a numerically zero eigenvalue of J J^T."""
    return 100.0 * d * torch.finfo(dtype).eps


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


def left_factor(rep, kind: str, rtol: float | None, on_zero: str, offset: int,
                engine=JacobianEngine) -> tuple[Tensor | None, Tensor]:
    """The normalisation of one side's Jacobians, the one place it is computed.

    Returns `(factor, rank)`: factor `(n, d, d)` is K(x,x)^-1/2 (correlation) or K(x,x)^+
    (influence), None for inner (no normalisation); rank `(n,)` is rank K(x, x) (d for inner).

    Raises:
        ZeroGradientError: samples with a zero gradient, unless `on_zero="zero"`.
    """
    if kind == "inner":
        n, d = engine.shape(rep)
        return None, torch.full((n,), d)
    factor, rank = psd_power(engine.self_gram(rep), -0.5 if kind == "correlation" else -1.0, rtol)
    if on_zero == "raise" and bool((rank == 0).any()):
        raise ZeroGradientError((torch.nonzero(rank == 0).flatten() + offset).tolist())
    return factor, rank


def _prepare(rep, kind: str, rtol: float | None, on_zero: str, offset: int,
             engine=JacobianEngine) -> tuple[object, Tensor]:
    """`(Q, rank)`: Q = K(x,x)^-1/2 J (correlation), K(x,x)^+ J (influence) or J (inner), in the
    engine's representation (`(n, d, p)` by default); see `left_factor`."""
    factor, rank = left_factor(rep, kind, rtol, on_zero, offset, engine)
    return (rep if factor is None else engine.transform(rep, factor)), rank


def _block(Qx, Qy, kind: str, reduce: str, engine=JacobianEngine) -> Tensor:
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


def _reduce(block: Tensor, kind: str, reduce: str, rank_x: Tensor, rank_y: Tensor) -> Tensor:
    """Applies a reduction to a `(bx, by)` trace block or a `(bx, by, d, d)` matrix block."""
    if reduce == "none":
        return block
    if reduce == "rot":
        # max over rotations R of Tr(R M) = sqrt((a + d)^2 + (b - c)^2) for M = [[a, b], [c, d]]
        block = torch.sqrt((block[..., 0, 0] + block[..., 1, 1]) ** 2
                           + (block[..., 0, 1] - block[..., 1, 0]) ** 2)
    # Divisor: d for inner (rank_x is d there), rank K(x, x) for influence, and
    # sqrt(rank K(x, x) rank K(x', x')) for correlation (Cauchy-Schwarz keeps |k^C| <= 1).
    if kind == "correlation":
        norm = torch.sqrt(rank_x.double().unsqueeze(1) * rank_y.double().unsqueeze(0))
    else:
        norm = rank_x.double().unsqueeze(1).expand(-1, rank_y.shape[0])
    norm = norm.to(block)  # dtype and device: the ranks may live on the CPU
    # A zero norm only occurs for samples given similarity 0 by on_zero="zero".
    return torch.where(norm > 0, block / norm.clamp_min(1), torch.zeros_like(block))


def _validate(kind: str, reduce: str, on_zero: str, d: int) -> None:
    _check_choice("kind", kind, KINDS)
    _check_choice("reduce", reduce, REDUCTIONS)
    _check_choice("on_zero", on_zero, ON_ZERO)
    if reduce == "rot" and d != 2:
        raise ValueError(f"reduce='rot' is the rotation-invariant kernel of 2-D outputs; here d = {d}")


def _prepare_columns(rep, kind: str, rtol, on_zero, offset: int, engine=JacobianEngine) -> tuple[object, Tensor]:
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
    if Jx.ndim != 3 or (Jy is not None and (Jy.ndim != 3 or Jy.shape[1:] != Jx.shape[1:])):
        raise ValueError("Jacobians must be (N, d, p) with matching d and p")
    _validate(kind, reduce, on_zero, Jx.shape[1])
    Qx, rank_x = _prepare(Jx, kind, rtol, on_zero, 0)
    Qy, rank_y = _prepare_columns(Jx if Jy is None else Jy, kind, rtol, on_zero, 0)
    return _reduce(_block(Qx, Qy, kind, reduce), kind, reduce, rank_x, rank_y)


def _prepared_rows(chunks, engine, kind: str, rtol, on_zero: str, offset: int) -> tuple[object, Tensor]:
    """Prepared Jacobians of a row block, normalised chunk by chunk; all zero-gradient samples
    of the block are named at once."""
    reps, ranks = [], []
    for start, rep in chunks:
        Q, rank = _prepare(rep, kind, rtol, "zero", start, engine)
        reps.append(Q)
        ranks.append(rank)
    rank = torch.cat(ranks)
    if on_zero == "raise" and kind != "inner" and bool((rank == 0).any()):
        raise ZeroGradientError((torch.nonzero(rank == 0).flatten() + offset).tolist())
    return engine.cat(reps), rank


def _transpose_block(block: Tensor, reduce: str) -> Tensor:
    """k(y, x) from k(x, y) for the symmetric kinds: K^C(x', x) = K^C(x, x')^T."""
    block = block.transpose(0, 1)
    return block.transpose(-1, -2) if reduce == "none" else block


def similarity(
    model: nn.Module,
    xs: Tensor,
    ys: Tensor | None = None,
    *,
    kind: str = "correlation",
    reduce: str = "trace",
    output_fn: OutputFn | None = None,
    x_targets: Tensor | None = None,
    y_targets: Tensor | None = None,
    chunk_size: int | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    rtol: float | None = None,
    on_zero: str = "raise",
    method: str = "auto",
    progress: bool = False,
    process_group=None,
) -> Tensor:
    """The similarity k(x, y) of every x in `xs` to every y in `ys`, streamed in blocks.

    Rows are processed in blocks whose Jacobian representation fits in `max_block_bytes`; for
    each block the columns stream by in chunks of `chunk_size` samples. Memory is therefore
    O(max_block_bytes + chunk + N M d^2) whatever N and M: the `(N + M, d, p)` gradient matrix
    is never held. The price is recomputing the columns' Jacobians once per row block. With the
    layer-wise engine a sample costs O(sum of layer widths) instead of O(p), so row blocks are
    large and Linear-layer blocks cost O(n m (in + out)) instead of O(n m in out). When `ys` is
    None and the kind is symmetric, only the upper block triangle is computed and mirrored.

    Args:
        model: the trained network (BatchNorm/Dropout in eval mode).
        xs: `(N, ...)` inputs; ys: `(M, ...)` inputs, None for `ys = xs`.
        kind: "inner" (k^I), "influence" (k^N: entry [i, j] is the influence of x_i on y_j,
            K(y_j, x_i) K(x_i, x_i)^-1 as a matrix), or "correlation" (k^C).
        reduce: "trace", "rot" (d = 2 only) or "none" (the d x d matrices).
        output_fn: maps the raw output batch to `(B, d)` (see `per_sample_grads`).
        x_targets, y_targets: per-sample side information for `output_fn` (class labels).
        chunk_size: samples per Jacobian evaluation.
        max_block_bytes: memory for one row block of Jacobians.
        rtol: relative eigenvalue cut-off for the (pseudo-)inverse roots of K(x, x).
        on_zero: "raise" (default) on samples with a zero gradient; "zero" gives them
            similarity 0 (not meaningful for "inner", which needs no normalisation).
        method: "auto" (per-layer rules when the model allows, see `netsim.engine`),
            "layerwise" or "jacobian" (full per-sample Jacobians: any model).
        progress: show a tqdm bar over the column evaluations.
        process_group: a `torch.distributed` group: every rank passes the same inputs, computes
            the rows of its shard of `xs` and returns the full matrix (rows all-gathered).

    Returns:
        `(N, M)` tensor for "trace"/"rot"; `(N, M, d, d)` for "none".

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> k = similarity(net, torch.randn(6, 2))
        >>> k.shape, torch.allclose(k.diagonal(), torch.ones(6), atol=1e-5)
        (torch.Size([6, 6]), True)
    """
    if process_group is not None:
        return _sharded_similarity(model, xs, ys, x_targets, y_targets, process_group, dict(
            kind=kind, reduce=reduce, output_fn=output_fn, chunk_size=chunk_size, max_block_bytes=max_block_bytes,
            rtol=rtol, on_zero=on_zero, method=method, progress=progress))
    symmetric = ys is None and kind != "influence"
    if ys is None:
        ys, y_targets = xs, x_targets
    d = output_dim(model, xs, output_fn, x_targets)
    _validate(kind, reduce, on_zero, d)
    if ys.shape[0] == 0:
        raise ValueError("ys is empty: nothing to compare with")
    engine = engine_for(model, xs, output_fn, x_targets, chunk_size, method)
    n, m = xs.shape[0], ys.shape[0]
    first = next(iter(trainable_parameters(model).values()))
    per_sample = engine.bytes_per_sample(d, first.element_size())
    # Row blocks hold their prepared Jacobians, and a block's gram temporaries are rows x chunk
    # (rows x rows on the diagonal): both must fit the budget.
    square = int(math.sqrt(max_block_bytes / (4 * d * d * first.element_size())))
    rows_per_block = max(engine.chunk, min(max_block_bytes // max(per_sample, 1), square))
    shape = (n, m) if reduce != "none" else (n, m, d, d)
    out = torch.empty(shape, dtype=first.dtype, device=first.device)
    n_blocks = math.ceil(n / rows_per_block)
    columns_total = sum(m - (b * rows_per_block if symmetric else 0) for b in range(n_blocks))
    bar = tqdm(total=n + columns_total, desc=f"k^{kind}", unit="sample", disable=not progress)

    def chunks(inputs, targets, start, stop):
        if start >= stop:
            return
        sub = None if targets is None else targets[start:stop]
        for s, rep in engine.chunks(inputs[start:stop], sub):
            bar.update(engine.size(rep))
            yield start + s, rep

    for r0 in range(0, n, rows_per_block):
        r1 = min(n, r0 + rows_per_block)
        Qx, rank_x = _prepared_rows(chunks(xs, x_targets, r0, r1), engine, kind, rtol, on_zero, r0)
        c_start = r0 if symmetric else 0
        if symmetric:  # the diagonal block reuses this block's own Jacobians
            out[r0:r1, r0:r1] = _reduce(_block(Qx, Qx, kind, reduce, engine), kind, reduce, rank_x, rank_x)
            bar.update(r1 - r0)
            c_start = r1
        for c0, rep_y in chunks(ys, y_targets, c_start, m):
            c1 = c0 + engine.size(rep_y)
            Qy, rank_y = _prepare_columns(rep_y, kind, rtol, on_zero, c0, engine)
            block = _reduce(_block(Qx, Qy, kind, reduce, engine), kind, reduce, rank_x, rank_y)
            out[r0:r1, c0:c1] = block
            if symmetric:
                out[c0:c1, r0:r1] = _transpose_block(block, reduce)
    bar.close()
    return out


def _sharded_similarity(model, xs, ys, x_targets, y_targets, group, options) -> Tensor:
    """This rank's rows of the similarity, all-gathered into the full matrix on every rank."""
    if ys is None:
        ys, y_targets = xs, x_targets
    rows = shard(len(xs), group)
    if rows.start < rows.stop:
        local = similarity(model, xs[rows], ys, x_targets=None if x_targets is None else x_targets[rows],
                           y_targets=y_targets, **options)
    else:  # no rows here, but the rank still joins the all_gather
        d = output_dim(model, xs, options["output_fn"], x_targets)
        first = next(iter(trainable_parameters(model).values()))
        shape = (0, len(ys)) if options["reduce"] != "none" else (0, len(ys), d, d)
        local = torch.zeros(shape, dtype=first.dtype, device=first.device)
    return gather_rows(local, len(xs), group)


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
