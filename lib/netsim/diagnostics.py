"""Diagnostics of a trained network read from its kernels (paper section 4.4, talk part IV).

- `uncertainty_factor`: how far f(x) could have moved during training without disturbing the
  other points: ||grad f(x)||^2 / sum_x' k^I(x, x') (the paper's quick approximation).
- `fit_diagnostic`: the neighbour count together with the spread of the targets within the
  neighbourhood, which separates over-fit (isolated points, labels learnt by heart) from
  under-fit (many neighbours with varied targets) and from mere high density.
- `kernel_average`: E_k[a](x) = (sum_x' K(x, x'))^-1 sum_x' K(x, x') a(x') with the
  un-normalised d x d kernels, the averaging operator of the self-denoising analysis.
- `kernel_sums` / `denoising_factor` / `self_denoising`: the talk's self-denoising estimate
  (part IV-bis): the predicted denoising factor sqrt(Tr sum_j A_ij A_ij^T / d) with
  A_ij = (sum_j K_ij)^-1 K_ij, the shift ||y^_i - E_k[y^]_i||, and the decomposition
  y^_i - E_k[y]_i = E_k[eps]_i + (y^_i - E_k[y^]_i) + (E_k[y^]_i - E_k[y~]_i).

The uncertainty factor and the kernel average are linear in sums of Jacobians, so like the
soft density they are computed in two passes without holding the gradient matrix. The
denoising factor needs sum_j K_ij K_ij^T, quadratic in the kernel: `kernel_sums` streams
kernel blocks instead (O(Q N d^2 p) time, never the N x N kernel nor the gradient matrix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import (
    check_data,
    check_keywords,
    check_positive_int,
    model_device,
)
from .data import Source, as_source
from .density import soft_count
from .engine import check_engine_options
from .grads import OutputFn, reduced_outputs, trainable_parameters
from .kernel import data_output_dim, default_rtol, engine_chunks, engine_for_data
from .memory import budget_bytes
from .params import ParamSpec


def _check_call(model: nn.Module, xs, targets: Tensor | None, *, chunk_size=None, method: str = "auto",
                other=None, other_targets: Tensor | None = None, other_name: str = "reference",
                memory_budget: int | None = None, rtol=None, params: ParamSpec = None,
                targets_key: str | None = None) -> tuple[Source, Source | None]:
    """The checks every function here runs before the model does; returns the data as `Source`s
    (`other`: None when not given)."""
    check_engine_options(model, method=method, chunk_size=chunk_size, params=params, rtol=rtol,
                         memory_budget=memory_budget)
    device = model_device(model)
    source = as_source(xs, targets, targets_key=targets_key, name="xs", device=device)
    check_data(model, source)
    if other is None:
        if other_targets is not None:
            raise ValueError(f"{other_name}_targets was given without {other_name}")
        return source, None
    other = as_source(other, other_targets, targets_key=targets_key, name=other_name,
                      targets_name=f"{other_name}_targets", device=device)
    check_data(model, other)
    return source, other


def _check_count(counted: int, n: int, what: str) -> None:
    if counted != n:
        raise ValueError(f"{what} has {n} rows but xs holds {counted} samples: one per sample needed")


def uncertainty_factor(model: nn.Module, xs, *, reference=None,
                       output_fn: OutputFn | None = None, targets: Tensor | None = None,
                       reference_targets: Tensor | None = None, chunk_size: int | None = None,
                       method: str = "auto", params: ParamSpec = None, targets_key: str | None = None) -> Tensor:
    """||grad f(x)||^2 / sum_x' k^I(x, x') for every x in `xs`. `(N, ...) -> (N,)`.

    For d > 1 both sides are traces: Tr K(x, x) / Tr sum_x' K(x, x'). A large value means that
    f(x) could have been set to many values without disturbing the training of the other
    points: an uncertain prediction. The reference set (default `xs`, self term included) is
    the training set whose disturbance is measured. Two passes: S = sum_x' J(x'), then
    Tr J(x) S^T: `reference` is read once, then `xs` once (`xs` twice when `reference` is None).
    Data forms, `params` and `targets_key`: see `netsim.similarity`.

    Raises:
        ValueError: where sum_x' k^I(x, x') <= 0 (the quick approximation of the paper is then
            meaningless: the total disturbance is sum |k^I|, not sum k^I).
    """
    xs, reference = _check_call(model, xs, targets, chunk_size=chunk_size, method=method, other=reference,
                                other_targets=reference_targets, params=params, targets_key=targets_key)
    if reference is None:
        xs.require_passes(2, "uncertainty_factor with reference=None")
        reference = xs
    engine = engine_for_data(model, xs, output_fn, chunk_size, method, params)
    S = None
    for _, rep in engine_chunks(engine, reference):
        S = engine.add_sums(S, engine.summed(rep))
    factors = []
    for start, rep in engine_chunks(engine, xs):
        own = engine.self_gram(rep).diagonal(dim1=-2, dim2=-1).sum(-1)
        total = engine.dot_with_sums(rep, S).diagonal(dim1=-2, dim2=-1).sum(-1)
        bad = torch.nonzero(total <= 0).flatten()
        if len(bad):
            raise ValueError(f"sum_x' k^I(x, x') <= 0 for samples {(bad + start).tolist()[:20]}: the "
                             "quick uncertainty approximation is undefined there")
        factors.append(own / total)
    return torch.cat(factors)


class SingularKernelSumError(ValueError):
    """sum_j K(x_i, x_j) is singular for some rows i: the kernel average E_k is undefined there."""

    def __init__(self, indices: list[int], rtol: float):
        self.indices = indices
        shown = ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")
        super().__init__(
            f"sum_j K(x_i, x_j) is singular (smallest / largest singular value <= {rtol:.3g}) for "
            f"{len(indices)} row(s) i = {shown}: the kernel average E_k[a](x_i) = (sum_j K_ij)^-1 "
            "sum_j K_ij a_j is undefined there. Typical causes: a zero gradient at x_i (e.g. an output "
            "that ignores the input there), or outputs whose gradients are linearly dependent. Drop "
            "those rows, or pass a smaller rtol if they are merely ill-conditioned.")


def solve_kernel_sums(total: Tensor, rhs: Tensor, *, rtol: float | None = None, offset: int = 0) -> Tensor:
    """(sum_j K_ij)^-1 applied row by row, with a clear error where it does not exist.

    Args:
        total: `(Q, d, d)` the sums S_i = sum_j K(x_i, x_j) (not symmetric in general).
        rhs: `(Q, d)` or `(Q, d, m)` right-hand sides (e.g. sum_j K_ij a_j).
        rtol: S_i counts as singular when its smallest singular value is <= rtol times its
            largest (default `kernel.default_rtol` of `total`'s dtype; for float64 sums of
            float32 kernels pass the float32 threshold, as `KernelSums` does).
        offset: added to the row numbers named in the error.

    Returns:
        S_i^-1 rhs_i, float64, same shape as `rhs`.

    Raises:
        SingularKernelSumError: naming every singular row.
    """
    if total.ndim != 3 or total.shape[1] != total.shape[2] or rhs.shape[0] != total.shape[0] \
            or rhs.shape[1] != total.shape[1]:
        raise ValueError(f"total must be (Q, d, d) and rhs (Q, d[, m]), got {tuple(total.shape)} and "
                         f"{tuple(rhs.shape)}")
    rtol = default_rtol(total.dtype, total.shape[1]) if rtol is None else rtol
    total = total.double()
    singular_values = torch.linalg.svdvals(total)               # (Q, d), descending
    bad = (singular_values[:, -1] <= rtol * singular_values[:, 0]) | (singular_values[:, 0] == 0)
    if bool(bad.any()):
        raise SingularKernelSumError((torch.nonzero(bad).flatten() + offset).tolist(), rtol)
    vector = rhs.ndim == 2
    out = torch.linalg.solve(total, rhs.double().unsqueeze(-1) if vector else rhs.double())
    return out.squeeze(-1) if vector else out


def _as_value_sets(values: Tensor, n: int, d: int) -> tuple[Tensor, bool]:
    """`(V, N, d)` value sets from `(N,)` (d = 1), `(N, d)` or `(V, N, d)`; and whether V was given."""
    several = values.ndim == 3
    if values.ndim == 1:
        values = values.unsqueeze(1)
    if values.ndim == 2:
        values = values.unsqueeze(0)
    if values.ndim != 3:
        raise ValueError(f"values must be (N,), (N, d) or (V, N, d), got {tuple(values.shape)}")
    if values.shape[1] != n:
        raise ValueError(f"values has {values.shape[1]} rows for {n} samples")
    if values.shape[2] != d:
        raise ValueError(f"values must have d = {d} columns (the output dimension), got {values.shape[2]}")
    return values, several


def kernel_average(model: nn.Module, xs, values: Tensor, *, queries=None,
                   output_fn: OutputFn | None = None, targets: Tensor | None = None,
                   query_targets: Tensor | None = None, chunk_size: int | None = None,
                   method: str = "auto", rtol: float | None = None, params: ParamSpec = None,
                   targets_key: str | None = None) -> Tensor:
    """E_k[a](x) = (sum_j K(x, x_j))^-1 sum_j K(x, x_j) a_j, un-normalised d x d kernels.

    Two passes: S = sum_j J_j and B = sum_j a_j^T J_j (one row per value set), then
    sum_j K(x, x_j) = J(x) S^T and sum_j K(x, x_j) a_j = J(x) B^T. Time O((N + Q) d p) whatever
    the number of value sets V, memory O(chunk d p + V p) -- less with the layer-wise engine.
    `xs` is read once, then `queries` once (`xs` twice when `queries` is None). Data forms,
    `params` and `targets_key`: see `netsim.similarity`; `values` follow the order of `xs`.
    (`kernel_sums` gets the same sums from kernel blocks, O(N Q d^2 p), when it also needs
    sum_j K_ij K_ij^T for the denoising factor.)

    Args:
        model: trained network.
        xs: `(N, ...)` samples x_j carrying the values.
        values: `(N, d)` (or `(N,)` for d = 1) values a_j, e.g. labels or predictions; or
            `(V, N, d)`: V value sets averaged in the same two passes.
        queries: `(Q, ...)` points where the average is taken (default xs).
        rtol: singularity threshold of sum_j K(x, x_j) (see `solve_kernel_sums`).

    Returns:
        `(Q, d)` kernel averages, or `(V, Q, d)` for `(V, N, d)` values.

    Raises:
        SingularKernelSumError: naming the queries where sum_j K(x, x_j) is singular.
    """
    xs, queries = _check_call(model, xs, targets, chunk_size=chunk_size, method=method, other=queries,
                              other_targets=query_targets, other_name="query", rtol=rtol, params=params,
                              targets_key=targets_key)
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a tensor, got {type(values).__name__}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("values has NaN or infinite entries")
    if queries is None:
        xs.require_passes(2, "kernel_average with queries=None")
        queries = xs
    d = data_output_dim(model, xs, output_fn)
    n = xs.length if xs.length is not None else values.shape[-2 if values.ndim == 3 else 0]
    values, several = _as_value_sets(values, n, d)
    engine = engine_for_data(model, xs, output_fn, chunk_size, method, params)
    dtype = next(iter(trainable_parameters(model, params).values())).dtype
    S = B = None
    counted = 0
    for start, rep in engine_chunks(engine, xs):
        counted = start + engine.size(rep)
        a = values[:, start:counted].to(dtype).permute(1, 0, 2)                   # (n, V, d)
        if a.shape[0] != engine.size(rep):
            _check_count(counted, n, "values")
        S = engine.add_sums(S, engine.summed(rep))
        B = engine.add_sums(B, engine.summed(engine.transform(rep, a)))          # rows a_j^T J_j
    _check_count(counted, n, "values")
    out = []
    for start, rep in engine_chunks(engine, queries):
        total_k = engine.dot_with_sums(rep, S)              # (n, d, d) sum_j K(x, x_j)
        weighted = engine.dot_with_sums(rep, B)             # (n, d, V) sum_j K(x, x_j) a_j
        out.append(solve_kernel_sums(total_k, weighted, rtol=rtol, offset=start).to(total_k.dtype))
    averages = torch.cat(out).permute(2, 0, 1)               # (V, Q, d)
    return averages if several else averages[0]


@dataclass
class KernelSums:
    """Row sums of the un-normalised kernels K_ij = J(x_i) J(x_j)^T over the samples x_j.

    Attributes:
        total: `(Q, d, d)` S_i = sum_j K_ij (float64).
        weighted: {name: `(Q, d)`} sum_j K_ij a_j for each value set a (float64).
        second_moment: `(Q, d, d)` M_i = sum_j K_ij K_ij^T (float64), or None if not asked for.
        n: the number N of samples x_j summed over.
        rtol: the default singularity threshold for solving with `total` (from the gradients'
            dtype: the sums are accumulated in float64, but each K_ij is only as exact as the
            gradients).
    """

    total: Tensor
    weighted: dict[str, Tensor]
    second_moment: Tensor | None
    n: int
    rtol: float

    def averages(self, rtol: float | None = None) -> dict[str, Tensor]:
        """{name: `(Q, d)` E_k[a]_i = S_i^-1 sum_j K_ij a_j} (float64).

        Raises:
            SingularKernelSumError: naming the rows where S_i is singular.
        """
        if not self.weighted:
            return {}
        names = list(self.weighted)
        stacked = torch.stack([self.weighted[k] for k in names], 2)          # (Q, d, V)
        solved = solve_kernel_sums(self.total, stacked, rtol=self.rtol if rtol is None else rtol)
        return {k: solved[..., v] for v, k in enumerate(names)}

    def denoising_factor(self, rtol: float | None = None) -> Tensor:
        """`(Q,)` predicted denoising factor sqrt(Tr(sum_j A_ij A_ij^T) / d), A_ij = S_i^-1 K_ij.

        sum_j A_ij A_ij^T = S_i^-1 M_i S_i^-T. If the noises eps_j are independent, zero-mean,
        with covariance sigma^2 I, E_k[eps]_i = sum_j A_ij eps_j has E||E_k[eps]_i||^2 =
        sigma^2 Tr(sum_j A_ij A_ij^T) while E||eps_j||^2 = d sigma^2: the factor is the ratio of
        their root-mean-squares, the talk's "denoising factor" (the paper's d = 2: 1/2 Tr).
        Since sum_j A_ij = I, Cauchy-Schwarz gives factor >= 1/sqrt(N), with equality iff every
        A_ij = I/N (all kernels K_ij equal: plain averaging over the whole set).

        Raises:
            SingularKernelSumError: naming the rows where S_i is singular.
            ValueError: if the sums were computed without `second_moment`.
        """
        if self.second_moment is None:
            raise ValueError("the denoising factor needs sum_j K_ij K_ij^T: call kernel_sums(..., second_moment=True)")
        d = self.total.shape[-1]
        identity = torch.eye(d, dtype=torch.float64).expand_as(self.total)
        inv = solve_kernel_sums(self.total, identity, rtol=self.rtol if rtol is None else rtol)   # S^-1
        spread = inv @ self.second_moment @ inv.transpose(-1, -2)             # S^-1 M S^-T
        return torch.sqrt(torch.diagonal(spread, dim1=-2, dim2=-1).sum(-1).clamp_min(0) / d)


def _value_dict(values: Mapping[str, Tensor] | None, n: int, d: int) -> dict[str, Tensor]:
    out = {}
    for name, v in (values or {}).items():
        v = v.unsqueeze(1) if v.ndim == 1 else v
        if v.ndim != 2 or v.shape != (n, d):
            raise ValueError(f"values[{name!r}] must be (N, d) = ({n}, {d}), got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"values[{name!r}] has non-finite entries (rows "
                             f"{torch.nonzero(~torch.isfinite(v).all(1)).flatten().tolist()[:20]})")
        out[name] = v.detach().double().cpu()
    return out


def kernel_sums(model: nn.Module, xs, values: Mapping[str, Tensor] | None = None, *,
                query_index: Tensor | None = None, second_moment: bool = True,
                output_fn: OutputFn | None = None, targets: Tensor | None = None,
                chunk_size: int | None = None, memory_budget: int | None = None,
                method: str = "auto", progress: bool = False, params: ParamSpec = None,
                targets_key: str | None = None) -> KernelSums:
    """S_i = sum_j K_ij, sum_j K_ij a_j for several value sets a, and sum_j K_ij K_ij^T, in one pass.

    K_ij = J(x_i) J(x_j)^T are the un-normalised d x d kernels (`similarity(kind="inner",
    reduce="none")`). The pass streams like `similarity`: the queries' Jacobians are held one
    row block at a time (half of `memory_budget`), the samples' Jacobians stream by in chunks, and
    each `(rows, chunk, d, d)` block of K is folded into the sums at once -- neither the
    gradient matrix nor the N x N kernel is ever held. When the queries are the samples
    themselves, only the upper block triangle is computed (K_ji = K_ij^T gives the rest).
    Time O(Q N d^2 p) (the second moment is quadratic in K: no two-pass shortcut exists; for
    S and the averages alone `kernel_average` is O((N + Q) d p)).

    Args:
        model: trained network.
        xs: `(N, ...)` samples x_j, the set summed over.
        values: {name: `(N, d)` (or `(N,)` for d = 1)} value sets a_j to average.
        query_index: `(Q,)` rows of xs where the sums are taken (default: all of them).
        second_moment: also accumulate sum_j K_ij K_ij^T (needed by `denoising_factor`).
        output_fn, targets: see `per_sample_grads`.
        chunk_size, memory_budget, method, progress, params, targets_key: see `netsim.similarity`.

    Data and passes: `xs` may be any re-iterable data form of `netsim.data` (values follow its
    order). The queries' row blocks are read from it (for a `query_index`, the query rows are
    picked: directly from a tensor or Dataset, in one pass holding the Q selected inputs for
    other data), then `xs` is read once per row block for the samples.

    Returns:
        `KernelSums` over the Q query rows (float64 accumulators).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> xs = torch.randn(20, 3)
        >>> sums = kernel_sums(net, xs, {"a": torch.randn(20, 2)})
        >>> sums.total.shape, sums.averages()["a"].shape, bool((sums.denoising_factor() >= 20 ** -0.5 - 1e-6).all())
        (torch.Size([20, 2, 2]), torch.Size([20, 2]), True)
    """
    xs, _ = _check_call(model, xs, targets, chunk_size=chunk_size, method=method, memory_budget=memory_budget,
                        params=params, targets_key=targets_key)
    xs.require_passes(2, "kernel_sums (the queries' row blocks, then the samples once per row block)")
    d = data_output_dim(model, xs, output_fn)
    n = xs.length
    if n is None:  # a generator or a loader of unknown length: the values tell N, the pass checks it
        n = next(iter(values.values())).shape[0] if values else None
    if n is None:
        raise ValueError("kernel_sums needs the number of samples: pass values, or data of known length")
    vals = _value_dict(values, n, d)
    symmetric = query_index is None
    rows = torch.arange(n) if symmetric else torch.as_tensor(query_index, dtype=torch.long).flatten()
    if rows.numel() == 0:
        raise ValueError("query_index is empty: no row to compute")
    if bool(((rows < 0) | (rows >= n)).any()):
        raise ValueError(f"query_index must lie in [0, {n}), got {rows.min().item()}..{rows.max().item()}")
    queries = xs if symmetric else xs.select(rows)
    engine = engine_for_data(model, queries, output_fn, chunk_size, method, params)
    first = next(iter(trainable_parameters(model, params).values()))
    per_sample = max(engine.bytes_per_sample(d, first.element_size()), 1)
    rows_per_block = max(engine.chunk, budget_bytes(memory_budget) // 2 // per_sample)   # half for the blocks of K
    q = rows.numel()
    total = torch.zeros(q, d, d, dtype=torch.float64)
    weighted = {k: torch.zeros(q, d, dtype=torch.float64) for k in vals}
    moment = torch.zeros(q, d, d, dtype=torch.float64) if second_moment else None
    n_blocks = math.ceil(q / rows_per_block)
    bar = tqdm(total=q + sum(n - (b * rows_per_block if symmetric else 0) for b in range(n_blocks)),
               desc="kernel sums", unit="sample", disable=not progress)

    def fold(at: slice, block: Tensor, columns: Tensor) -> None:
        """Adds a `(b, m, d, d)` block K[i, j] of rows `at` against samples `columns`."""
        block = block.double().cpu()
        total[at] += block.sum(1)
        for k, v in vals.items():
            weighted[k][at] += torch.einsum("ijab,jb->ia", block, v[columns])
        if moment is not None:
            moment[at] += torch.einsum("ijab,ijcb->iac", block, block)

    def chunks(source, start=0, stop=None):
        for offset, rep in engine_chunks(engine, source, start, stop):
            bar.update(engine.size(rep))
            yield offset, rep

    for r0 in range(0, q, rows_per_block):
        r1 = min(q, r0 + rows_per_block)
        Rx = engine.cat([rep for _, rep in chunks(queries, r0, r1)])
        c_start = 0
        if symmetric:   # the diagonal block from the block's own Jacobians; K_ji = K_ij^T for the rest
            fold(slice(r0, r1), engine.gram(Rx, Rx, False), rows[r0:r1])
            bar.update(r1 - r0)
            c_start = r1
        if c_start >= n:
            continue
        c1 = c_start
        for c0, rep_y in chunks(xs, c_start):
            c1 = c0 + engine.size(rep_y)
            if c1 > n:
                break
            block = engine.gram(Rx, rep_y, False)                      # (b, m, d, d): K(x_i, x_j)
            fold(slice(r0, r1), block, torch.arange(c0, c1))
            if symmetric:
                fold(slice(c0, c1), block.permute(1, 0, 3, 2), rows[r0:r1])
        _check_count(c1, n, "values")
    bar.close()
    return KernelSums(total=total, weighted=weighted, second_moment=moment, n=n,
                      rtol=default_rtol(first.dtype, d))


def denoising_factor(model: nn.Module, xs: Tensor, **kernel_sums_kwargs) -> Tensor:
    """`(Q,)` predicted denoising factor at each query (`KernelSums.denoising_factor`).

    Keyword arguments go to `kernel_sums` (query_index, output_fn, method, ...).
    """
    kernel_sums_kwargs["second_moment"] = True
    return kernel_sums(model, xs, **kernel_sums_kwargs).denoising_factor()


@dataclass
class SelfDenoising:
    """The self-denoising decomposition at Q training points (talk, part IV-bis), all float64.

    With true labels y, noisy labels y~ = y + eps, predictions y^ = f(x) and the kernel
    average E_k (un-normalised d x d kernels, `kernel_sums`):

        y^_i - E_k[y]_i = E_k[eps]_i + (y^_i - E_k[y^]_i) + (E_k[y^]_i - E_k[y~]_i)

    an identity (E_k is linear: E_k[eps] = E_k[y~] - E_k[y]); `residual` is what is left of
    it numerically. At a stationary point of the training loss sum_i ||y^_i - y~_i||^2 the
    last term vanishes (grad = sum_j J_j^T (y^_j - y~_j) = 0 implies sum_j K_ij (y^_j - y~_j)
    = 0), so the error to the smoothed truth is the averaged noise plus the shift.

    Attributes:
        error: `(Q, d)` y^_i - E_k[y]_i, the prediction's error to the kernel-smoothed truth.
        noise_average: `(Q, d)` E_k[eps]_i, the label noise that survives the averaging.
        shift: `(Q, d)` y^_i - E_k[y^]_i.
        convergence_gap: `(Q, d)` E_k[y^]_i - E_k[y~]_i (0 at a stationary point).
        residual: `(Q, d)` error - (noise_average + shift + convergence_gap).
        true_average, predicted_average, noisy_average: `(Q, d)` E_k[y], E_k[y^], E_k[y~].
        factor: `(Q,)` predicted denoising factor (`KernelSums.denoising_factor`).
        measured_factor: `(Q,)` ||E_k[eps]_i|| / rms_j ||eps_j||: its root-mean-square over the
            queries is what `factor` predicts when the noises are independent (they need not be).
        shift_norm: `(Q,)` ||y^_i - E_k[y^]_i|| (the talk's "shift", in output units: pixels here).
        noise_rms: sqrt(mean_j ||eps_j||^2) over all N samples.
        query_index: `(Q,)` rows of the samples the queries are.
    """

    error: Tensor
    noise_average: Tensor
    shift: Tensor
    convergence_gap: Tensor
    residual: Tensor
    true_average: Tensor
    predicted_average: Tensor
    noisy_average: Tensor
    factor: Tensor
    measured_factor: Tensor
    shift_norm: Tensor
    noise_rms: float
    query_index: Tensor

    def summary(self) -> dict[str, float]:
        """Headline numbers: rms predicted and measured factors, shift median / p90, residual max."""
        return {
            "factor_predicted_rms": float(self.factor.pow(2).mean().sqrt()),
            "factor_measured_rms": float(self.measured_factor.pow(2).mean().sqrt()),
            "factor_predicted_median": float(self.factor.median()),
            "shift_median": float(self.shift_norm.median()),
            "shift_p90": float(torch.quantile(self.shift_norm, 0.9)),
            "noise_rms": self.noise_rms,
            "residual_max": float(self.residual.abs().max()),
        }


def predictions(model: nn.Module, xs, *, output_fn: OutputFn | None = None,
                targets: Tensor | None = None, batch_size: int = 64, targets_key: str | None = None) -> Tensor:
    """`(N, d)` the (reduced) outputs f(x) whose gradients define the kernels, without gradients.
    `xs`: any data form of `netsim.data`, read once in slices of `batch_size`."""
    check_positive_int("batch_size", batch_size)
    source, _ = _check_call(model, xs, targets, targets_key=targets_key)
    return torch.cat([reduced_outputs(model, inputs, output_fn, sub) for _, inputs, sub in source.chunks(batch_size)])


def self_denoising(model: nn.Module, xs, *, true: Tensor, noisy: Tensor,
                   predicted: Tensor | None = None, query_index: Tensor | None = None,
                   output_fn: OutputFn | None = None, targets: Tensor | None = None,
                   rtol: float | None = None, **kernel_sums_kwargs) -> SelfDenoising:
    """The decomposition of `SelfDenoising`, the denoising factor and the shift, in one kernel pass.

    Args:
        model: the network trained on (xs, noisy).
        xs: `(N, ...)` its training inputs (the set E_k averages over).
        true: `(N, d)` true labels y.
        noisy: `(N, d)` the labels it was trained on, y~ = y + eps.
        predicted: `(N, d)` predictions y^ = f(x) (default: computed with `predictions`; pass
            them when f is not exactly the model's reduced output).
        query_index: `(Q,)` rows where the decomposition is evaluated (default: all N; each
            query costs a pass over the N samples, O(N d^2 p)).
        output_fn, targets: see `per_sample_grads`.
        rtol: singularity threshold for sum_j K_ij (`solve_kernel_sums`).
        **kernel_sums_kwargs: chunk_size, memory_budget, method, progress, params, targets_key.

    Data and passes: `xs` as in `kernel_sums` (one more pass for the predictions when
    `predicted` is not given); the labels follow its order.

    Returns:
        `SelfDenoising` at the Q queries.

    Raises:
        SingularKernelSumError: naming the queries where sum_j K_ij is singular.
    """
    check_keywords(kernel_sums_kwargs, ("chunk_size", "memory_budget", "method", "progress", "params",
                                        "targets_key"), "self_denoising")
    xs, _ = _check_call(model, xs, targets, rtol=rtol,
                        **{k: v for k, v in kernel_sums_kwargs.items() if k != "progress"})
    kernel_sums_kwargs.pop("targets_key", None)   # carried by the source from here on
    n = xs.length if xs.length is not None else true.shape[0]
    xs.require_passes(2 if predicted is not None else 3, "self_denoising")
    d = data_output_dim(model, xs, output_fn)
    if predicted is None:
        predicted = predictions(model, xs, output_fn=output_fn)
    true, noisy, predicted = (_value_dict({k: v}, n, d)[k] for k, v in
                              (("true", true), ("noisy", noisy), ("predicted", predicted)))
    noise = noisy - true
    rows = torch.arange(n) if query_index is None else torch.as_tensor(query_index, dtype=torch.long).flatten()
    sums = kernel_sums(model, xs, {"true": true, "noisy": noisy, "predicted": predicted, "noise": noise},
                       query_index=query_index, second_moment=True, output_fn=output_fn, **kernel_sums_kwargs)
    avg = sums.averages(rtol)
    error = predicted[rows] - avg["true"]
    shift = predicted[rows] - avg["predicted"]
    gap = avg["predicted"] - avg["noisy"]
    noise_rms = float(noise.pow(2).sum(1).mean().sqrt())
    noise_norm = avg["noise"].norm(dim=1)
    return SelfDenoising(
        error=error, noise_average=avg["noise"], shift=shift, convergence_gap=gap,
        residual=error - (avg["noise"] + shift + gap), true_average=avg["true"],
        predicted_average=avg["predicted"], noisy_average=avg["noisy"], factor=sums.denoising_factor(rtol),
        measured_factor=noise_norm / noise_rms if noise_rms > 0 else torch.full_like(noise_norm, float("nan")),
        shift_norm=shift.norm(dim=1), noise_rms=noise_rms, query_index=rows)


@dataclass
class FitDiagnostic:
    """Per-sample fit diagnostic (all `(N,)`).

    Attributes:
        count: soft neighbour count N_S (self included).
        local_std: spread of the targets among the neighbours (positive-k^C weighted std).
        relative_std: local_std / global target std.
        overfit: isolated points (count < `isolated_below`): any label could be learnt by heart.
        underfit: crowded neighbourhoods with varied targets (count > `crowded_above` and
            relative_std > `varied_above`): the network cannot tell apart points whose labels differ.
    """

    count: Tensor
    local_std: Tensor
    relative_std: Tensor
    overfit: Tensor
    underfit: Tensor


def fit_diagnostic(kc: Tensor, targets: Tensor, *, isolated_below: float = 2.0,
                   crowded_above: float | None = None, varied_above: float = 0.5) -> FitDiagnostic:
    """Combines neighbour counts with the target variance in each neighbourhood (section 4.4).

    Args:
        kc: `(N, N)` k^C among the training samples.
        targets: `(N,)` or `(N, k)` training targets.
        isolated_below: soft counts below this flag a likely over-fit (default 2: hardly more than
            the point itself).
        crowded_above: soft counts above this may under-fit (default: 10% of the data set).
        varied_above: ... when the neighbours' target std exceeds this fraction of the global std.
    """
    if kc.ndim != 2 or kc.shape[0] != kc.shape[1] or kc.shape[0] != targets.shape[0]:
        raise ValueError("kc must be (N, N) and targets (N, ...) for the same N samples")
    y = targets.reshape(targets.shape[0], -1).to(kc.dtype)
    w = kc.clamp_min(0)
    w_sum = w.sum(1, keepdim=True)              # >= 1: the self term k^C(x, x) = 1
    mean = w @ y / w_sum
    local_var = (w @ (y * y) / w_sum - mean * mean).clamp_min(0).sum(1)
    global_std = y.std(0, unbiased=False).pow(2).sum().sqrt()
    if global_std == 0:
        raise ValueError("all targets are equal: the relative spread of targets is undefined")
    count = soft_count(kc)
    local_std = local_var.sqrt()
    relative = local_std / global_std
    crowded = 0.1 * kc.shape[0] if crowded_above is None else crowded_above
    return FitDiagnostic(count=count, local_std=local_std, relative_std=relative,
                         overfit=count < isolated_below,
                         underfit=(count > crowded) & (relative > varied_above))
