"""Neighbour counts from the similarity k^C (paper section 4): hard, soft, positive-only.

Conventions (also in every figure that shows them):

- hard        N_tau(x)     = #{x' != x : k^C(x, x') >= tau}            self excluded
- soft        N_S(x)       = sum_x' k^C(x, x')                         self included (k^C(x, x) = 1)
- positive    N_alpha^+(x) = sum_{x' != x, k^C > 0} k^C(x, x')^alpha   self excluded

so that int_0^1 N_tau dtau = N_1^+ and, when no k^C is negative, N_S = N_1^+ + 1. A k^C within
`tie_tolerance` below tau counts as reaching it: float32 rounding must not decide ties, e.g.
duplicate inputs (k^C = 1) at tau = 1, whatever the engine.

The estimators of a precomputed `(N, M)` similarity matrix (small N: compute it once and read
every estimator from it) are `counts_from_kernel` and friends. From a model, `neighbour_counts`
never holds an N x N matrix: the hard and positive counts fold the blocks of
`kernel.similarity_blocks` into per-row counts as they stream by, and `soft_density` needs no
matrix at all: the soft count is a dot product with the sum of the normalised Jacobians
(section 4.2), computed in two passes over the data, O(N d^2 p) time and O(chunk d p) memory
(or, when the normalised Jacobians fit in `memory_budget`, one pass and that memory).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import (
    check_choice,
    check_data,
    check_keywords,
    check_model,
    model_device,
)
from .data import Source, as_source
from .distributed import all_reduce_, gather_rows, shard
from .engine import check_engine_options
from .grads import OutputFn, output_jvp, trainable_parameters
from .kernel import (
    ON_ZERO,
    engine_chunks,
    engine_for_data,
    left_factor,
    shared_method,
    similarity_blocks,
)
from .layerwise import TokenFactors, TokenSum
from .memory import budget_bytes
from .params import ParamSpec

ESTIMATORS = ("hard", "soft", "positive")
#: The options `neighbour_counts` passes on, per estimator (soft: `soft_density`'s; hard and
#: positive: `similarity`'s, the kind and reduction being fixed).
_SOFT_DENSITY_OPTIONS = ("chunk_size", "rtol", "on_zero", "method", "process_group", "params", "targets_key",
                         "memory_budget")
_MATRIX_OPTIONS = ("chunk_size", "memory_budget", "rtol", "on_zero", "method", "progress", "process_group",
                   "params", "targets_key")


def tie_tolerance(dtype: torch.dtype) -> float:
    """How far below tau a k^C still counts as reaching it: 256 units of rounding (3e-5 in
    float32), below the accuracy of a float32 gram of many parameters."""
    return 256 * torch.finfo(dtype).eps


def _check_tau(tau: float) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1] (a threshold on k^C), got {tau!r}")


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")


def _contributions(kc: Tensor, estimator: str, tau: float, alpha: float, *, inplace: bool = False) -> Tensor:
    """What each entry of a k^C block adds to its row's count: 1 where it reaches tau (hard), or its
    alpha-th power where it is positive (positive; computed in kc's memory when `inplace`)."""
    if estimator == "hard":
        return kc >= tau - tie_tolerance(kc.dtype)
    return kc.clamp_(min=0).pow_(alpha) if inplace else kc.clamp_min(0) ** alpha


def _counts_excluding(contributions: Tensor, rows: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
    """`(N,)` row sums of `contributions` less the entries at (rows[i], columns[i]) (each sample's own)."""
    sums = contributions.sum(1).to(dtype)
    return sums.index_put_((rows,), -contributions[rows, columns].to(dtype), accumulate=True)


def _own_entries(kc: Tensor, self_index: Tensor | None) -> tuple[Tensor, Tensor]:
    """(rows, columns) of each query's own sample: `self_index`, the diagonal when N = M, else none."""
    if self_index is None and kc.shape[0] == kc.shape[1]:
        self_index = torch.arange(kc.shape[0], device=kc.device)
    if self_index is None:
        none = torch.zeros(0, dtype=torch.long, device=kc.device)
        return none, none
    return torch.arange(kc.shape[0], device=kc.device), self_index.to(kc.device)


def hard_count(kc: Tensor, tau: float, self_index: Tensor | None = None) -> Tensor:
    """N_tau: neighbours with k^C >= tau (within `tie_tolerance`), self excluded.

    Args:
        kc: `(N, M)` k^C of each query to each reference sample.
        tau: threshold in [0, 1].
        self_index: `(N,)` column of each query's own sample; default: the diagonal when
            N = M (the queries are the references), none otherwise.

    Returns:
        `(N,)` counts (float).
    """
    _check_tau(tau)
    return _counts_excluding(_contributions(kc, "hard", tau, 0.0), *_own_entries(kc, self_index), kc.dtype)


def positive_count(kc: Tensor, alpha: float, self_index: Tensor | None = None) -> Tensor:
    """N_alpha^+: sum of k^C^alpha over positive similarities, self excluded. `(N, M) -> (N,)`."""
    _check_alpha(alpha)
    return _counts_excluding(_contributions(kc, "positive", 0.0, alpha), *_own_entries(kc, self_index), kc.dtype)


def soft_count(kc: Tensor) -> Tensor:
    """N_S: the plain row sum of k^C, self included. `(N, M) -> (N,)`."""
    return kc.sum(1)


def counts_from_kernel(kc: Tensor, estimator: str, *, tau: float = 0.9, alpha: float = 2.0,
                       self_index: Tensor | None = None) -> Tensor:
    """Any estimator from a precomputed `(N, M)` k^C matrix (see the module conventions)."""
    if estimator == "hard":
        return hard_count(kc, tau, self_index)
    if estimator == "positive":
        return positive_count(kc, alpha, self_index)
    if estimator == "soft":
        return soft_count(kc)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def neighbour_counts(model: nn.Module, xs, *, estimator: str = "hard", tau: float = 0.9,
                     alpha: float = 2.0, output_fn: OutputFn | None = None,
                     targets: Tensor | None = None, **options) -> Tensor:
    """Neighbour counts of every x in `xs` among `xs` itself. `(N, ...) -> (N,)`.

    No N x N matrix is held: the soft estimate goes through `soft_density`; the hard and
    positive-only counts stream the blocks of k^C (`kernel.similarity_blocks`, the upper block
    triangle) and fold each into per-row counts. Memory O(memory_budget + N).

    Data and passes: `xs` may be any data form of `netsim.data`. "soft" reads it twice
    (`soft_density`); "hard" and "positive" read it once for the row blocks and once more per
    row block for the columns (`similarity` with ys=None); a one-shot generator is refused.

    Args:
        estimator: "hard" (N_tau), "soft" (N_S) or "positive" (N_alpha^+); see the module.
        tau: threshold of the hard count, in [0, 1].
        alpha: exponent of the positive count, > 0.
        output_fn, targets: see `per_sample_grads`.
        **options: for "soft", those of `soft_density` (chunk_size, rtol, on_zero, method,
            process_group, params, targets_key); otherwise those of `similarity` (also
            memory_budget, progress). Anything else is a TypeError.
    """
    check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "soft":
        check_keywords(options, _SOFT_DENSITY_OPTIONS, "neighbour_counts(estimator='soft')")
        return soft_density(model, xs, output_fn=output_fn, targets=targets, **options)
    check_keywords(options, _MATRIX_OPTIONS, f"neighbour_counts(estimator={estimator!r})")
    _check_tau(tau) if estimator == "hard" else _check_alpha(alpha)
    group = options.pop("process_group", None)
    if group is None:
        return _streamed_counts(model, xs, None, targets, 0, estimator, tau, alpha, output_fn, options)
    # each rank counts the rows of its shard against every sample; rows all-gathered
    check_model(model)
    source = as_source(xs, targets, targets_key=options.pop("targets_key", None), name="xs",
                       device=model_device(model))
    check_data(model, source)
    if source.length is None:
        raise ValueError("process_group needs data of known length (a tensor, a Dataset or a DataLoader over one)")
    options["method"] = shared_method(model, source, output_fn, options.get("chunk_size"),
                                      options.get("method", "auto"), options.get("params"), group)
    rows = shard(source.length, group)
    if rows.start < rows.stop:
        local = _streamed_counts(model, source.rows(rows.start, rows.stop), source, None, rows.start,
                                 estimator, tau, alpha, output_fn, options)
    else:
        first = next(iter(trainable_parameters(model, options.get("params")).values()))
        local = torch.zeros(0, dtype=first.dtype, device=first.device)
    return gather_rows(local, source.length, group)


def _streamed_counts(model, queries, samples, query_targets, offset: int, estimator: str,
                     tau: float, alpha: float, output_fn, options: dict, sample_targets=None) -> Tensor:
    """Counts of `queries` (rows `offset`... of the samples) among `samples` (None: the
    queries themselves, symmetric blocks), from streamed k^C blocks."""
    counts = None
    blocks = similarity_blocks(model, queries, samples, kind="correlation", reduce="trace", output_fn=output_fn,
                               x_targets=query_targets, y_targets=sample_targets, **options)
    for rows, cols, block, mirrored in blocks:
        if counts is None:
            counts = block.new_zeros(0)
        stop = max(rows.stop, cols.stop if mirrored else 0)
        if stop > len(counts):  # grown as rows arrive (the number of queries may be unknown up front)
            counts = torch.cat([counts, counts.new_zeros(stop - len(counts))])
        # each query's own sample, where this block holds it: query i is sample i + offset
        first, last = max(rows.start + offset, cols.start), min(rows.stop + offset, cols.stop)
        own = torch.arange(first, max(first, last), device=block.device)
        contributions = _contributions(block, estimator, tau, alpha, inplace=True)   # the block is consumed
        counts[rows] += _counts_excluding(contributions, own - offset - rows.start, own - cols.start, counts.dtype)
        if mirrored:   # an upper block of a symmetric call: it holds no sample's own entry
            counts[cols] += contributions.sum(0).to(counts.dtype)
    return counts


def soft_normaliser(engine, rep, rtol: float | None, on_zero: str, offset: int) -> Tensor:
    """`(n, d, d)` left factors K(x,x)^-1/2 / sqrt(rank), so that k^C(x, x') becomes the plain
    Frobenius product <Q_x, Q_x'> of Q = factor J."""
    factor, rank = left_factor(rep, "correlation", rtol, on_zero, offset, engine)
    scale = torch.where(rank > 0, rank.to(factor.dtype).clamp_min(1).rsqrt(),
                        torch.zeros_like(rank, dtype=factor.dtype))
    return factor * scale[:, None, None]


def _normalised(engine, rep, rtol: float | None, on_zero: str, offset: int):
    return engine.transform(rep, soft_normaliser(engine, rep, rtol, on_zero, offset))


def soft_density(model: nn.Module, xs, *, reference=None,
                 output_fn: OutputFn | None = None, targets: Tensor | None = None,
                 reference_targets: Tensor | None = None, chunk_size: int | None = None,
                 rtol: float | None = None, on_zero: str = "raise", method: str = "auto",
                 process_group=None, params: ParamSpec = None, targets_key: str | None = None,
                 memory_budget: int | None = None) -> Tensor:
    """The soft neighbour count N_S(x) = sum_x' k^C(x, x') without any N x N matrix.

    Two passes (paper section 4.2): first A = sum_x' Q(x') over the reference set, with
    Q(x') = K(x',x')^-1/2 J(x') / sqrt(rank) (for d = 1 simply g(x') / ||g(x')||); then
    N_S(x) = Tr(Q(x) A^T) for every query. Memory O(chunk + |A| + N d^2), independent of p x N:
    the gradient matrix is never held. With the layer-wise engine (`method="auto"` on ordinary
    models) A is kept per layer. When the queries are the reference set (`reference=None`):
    if the first pass's Q(x) of every sample fit in `memory_budget` they are kept, and the
    second pass is the dot product alone, with no model evaluation; otherwise only each
    sample's d x d normaliser is kept and the second pass runs in forward mode: J(x) A^T is d
    `torch.func.jvp`s of the outputs along the rows of A, with no backward pass and no
    per-sample gradient (benchmarked in `bench/`). Models with token maps (Hugging Face
    transformers) keep those maps' per-token factors instead, and their second pass recomputes
    the factors (a forward and a backward per chunk) and contracts them with A.

    Data and passes: `xs` and `reference` may be any data form of `netsim.data` (tensors,
    Datasets, DataLoaders, iterables of batches). `reference` is read once, then `xs` once;
    with `reference=None`, `xs` is read twice (so a one-shot generator is refused).

    Args:
        model: the trained network.
        xs: `(N, ...)` queries.
        reference: `(M, ...)` samples counted as potential neighbours; None means xs (then the
            count includes the self term k^C(x, x) = 1).
        output_fn, targets, reference_targets: see `per_sample_grads`.
        chunk_size: samples per Jacobian evaluation.
        rtol, on_zero, method: see `netsim.similarity`.
        process_group: a `torch.distributed` group: every rank passes the same inputs, works
            on its shard of the reference set (sums all-reduced) and of the queries (counts
            all-gathered), and returns the full result (`netsim.distributed`); the data must
            have a known length.
        params: the parameters whose gradients define k^C (`netsim.params`; see `similarity`).
        targets_key: the key of the targets in dict batches.
        memory_budget: bytes for keeping the normalised Jacobians between the passes when
            `reference` is None (a non-negative int; 0 never keeps them; None: `budget_bytes()`,
            the environment variable NETSIM_MEMORY_BUDGET or 1 GiB). The Jacobian engine takes d p
            values per sample, the layer-wise one its factors (`bench/` reports both).

    Returns:
        `(N,)` soft counts.

    Raises:
        ZeroGradientError: samples with a zero gradient, unless `on_zero="zero"`.
        NonFiniteError: samples with NaN or infinite inputs, outputs or gradients.
    """
    queries, reference = check_soft_density_call(model, xs, reference, targets, reference_targets, chunk_size, rtol,
                                                 on_zero, method, params=params, targets_key=targets_key)
    kept_budget = budget_bytes(memory_budget)   # checked before the model runs
    same = reference is None
    if same:
        reference = queries
    if process_group is not None:   # every rank must add up the same representation
        method = shared_method(model, queries, output_fn, chunk_size, method, params, process_group,
                               choose=_density_engine)
    engine = _density_engine(model, queries, output_fn, chunk_size, method, params)
    engine.saw_tokens = False
    n_queries = queries.length
    if process_group is not None:
        if queries.length is None or reference.length is None:
            raise ValueError("process_group needs data of known length (a tensor, a Dataset or a DataLoader over one)")
        ref_rows, query_rows = shard(reference.length, process_group), shard(queries.length, process_group)
        whole_reference = reference
        reference, queries = reference.rows(ref_rows.start, ref_rows.stop), queries.rows(query_rows.start,
                                                                                           query_rows.stop)
        offset = ref_rows.start
    else:
        offset = 0
    normalisers = [] if same else None          # (n, d, d) per chunk: O(N d^2), reused in pass 2
    kept = [] if same else None                 # Q per chunk, while they fit in the budget
    if process_group is not None and reference.length == 0:  # an empty shard adds zeros of the right structure
        total = _normalised_sums(engine, whole_reference.rows(0, 1), rtol, on_zero, 0)
        for t in engine.sum_tensors(total):
            t.zero_()
    else:
        total = _normalised_sums(engine, reference, rtol, on_zero, offset, normalisers, kept, kept_budget)
    if process_group is not None:
        all_reduce_(engine.sum_tensors(total), process_group)
    counts = []
    if same and kept and len(kept) == len(normalisers):   # every Q kept: no second pass over the data
        for q in kept:
            counts.append(engine.dot_with_sums(q, total).diagonal(dim1=-2, dim2=-1).sum(-1))
    elif same and queries.length != 0 and engine.saw_tokens:
        # Second pass from the factors recomputed (a forward and a backward per chunk): the jvps
        # would run the model in forward mode, as costly, and its sums are kept per token map
        for (_, rep), factor in zip(_chunks(engine, queries), normalisers):
            counts.append(engine.dot_with_sums(engine.transform(rep, factor), total).diagonal(dim1=-2, dim2=-1).sum(-1))
    elif same and queries.length != 0:
        # Second pass in forward mode: J(x) A^T column by column, one jvp per output row of A.
        tangents = [engine.tangent(total, b) for b in range(normalisers[0].shape[1])]
        for (_, inputs, sub), factor in zip(queries.chunks(engine.chunk), normalisers):
            jt = torch.stack([output_jvp(model, inputs, t, output_fn, sub, params=params) for t in tangents], 2)
            counts.append((factor @ jt).diagonal(dim1=-2, dim2=-1).sum(-1))
    elif queries.length != 0:
        for start, rep in _chunks(engine, queries):
            products = engine.dot_with_sums(_normalised(engine, rep, rtol, on_zero, start), total)
            counts.append(products.diagonal(dim1=-2, dim2=-1).sum(-1))
    first = next(iter(trainable_parameters(model, params).values()))
    local = torch.cat(counts) if counts else torch.zeros(0, dtype=first.dtype, device=first.device)
    return local if process_group is None else gather_rows(local, n_queries, process_group)


def check_soft_density_call(model: nn.Module, xs, reference, targets: Tensor | None,
                            reference_targets: Tensor | None, chunk_size: int | None, rtol: float | None,
                            on_zero: str, method: str, *, params: ParamSpec = None,
                            targets_key: str | None = None) -> tuple[Source, Source | None]:
    """Every check of `soft_density`'s arguments that needs no forward pass; returns the data
    as `Source`s (reference: None when it is xs)."""
    check_choice("on_zero", on_zero, ON_ZERO)
    check_engine_options(model, method=method, chunk_size=chunk_size, params=params, rtol=rtol)
    device = model_device(model)
    queries = as_source(xs, targets, targets_key=targets_key, name="xs", device=device)
    check_data(model, queries)
    if reference is None:
        if reference_targets is not None:
            raise ValueError("reference_targets was given without reference: pass targets alone when reference is None")
        queries.require_passes(2, "soft_density with reference=None")
        return queries, None
    reference = as_source(reference, reference_targets, targets_key=targets_key, name="reference",
                          targets_name="reference_targets", device=device)
    check_data(model, reference)
    return queries, reference


def _chunks(engine, source: Source):
    """`engine_chunks`, a tied parameter's token uses (`layerwise.TokenSum`) formed into one dense entry;
    notes on the engine whether it met token maps (`saw_tokens`)."""
    for start, rep in engine_chunks(engine, source):
        if engine.tokens:
            engine.saw_tokens |= any(isinstance(f, (TokenFactors, TokenSum)) for f in rep)
            rep = [f.dense() if isinstance(f, TokenSum) else f for f in rep]
        yield start, rep


def _density_engine(model: nn.Module, source: Source, output_fn, chunk_size: int | None, method: str,
                    params: ParamSpec):
    """`soft_density`'s engine. The layer-wise one keeps maps shared by token positions as their
    per-token factors here, so their sums and dot products need no per-sample gradient: `auto`
    takes it wherever its rules run and the model has such maps (its timing of a kernel's work
    would not tell; N = 4096, 1 thread: BERT 2.6x an epoch, 5.6x with dense gradients; the bench
    transformer 2.2x, 5.3x on the Jacobian engine), else measures as the kernels do."""
    if method == "auto":
        engine = engine_for_data(model, source, output_fn, chunk_size, method, params, measure=False)
        engine.tokens = engine.name == "layerwise"
        if engine.name != "layerwise" or engine.has_tokens:
            return engine
    engine = engine_for_data(model, source, output_fn, chunk_size, method, params)
    engine.tokens = engine.name == "layerwise"
    return engine


def _normalised_sums(engine, source: Source, rtol, on_zero: str, offset: int, normalisers: list | None = None,
                     kept: list | None = None, max_kept_bytes: int = 0) -> list:
    """First pass: sum of the normalised Jacobians Q(x') / sqrt(rank) over `source`, per layer.

    Appends each chunk's normalisers to `normalisers` when given, and each chunk's Q to `kept`
    while their total stays within `max_kept_bytes` (past it, `kept` is emptied for good)."""
    total, kept_bytes = None, 0
    for start, rep in _chunks(engine, source):
        factor = soft_normaliser(engine, rep, rtol, on_zero, offset + start)
        if normalisers is not None:
            normalisers.append(factor)
        q = engine.transform(rep, factor)
        if kept is not None and kept_bytes <= max_kept_bytes:
            kept_bytes += engine.nbytes(q)
            if kept_bytes <= max_kept_bytes:
                kept.append(q)
            else:
                kept.clear()
        total = engine.add_sums(total, engine.summed(q))
    return total


def estimator_name(estimator: str, *, tau: float | None = None, alpha: float | None = None) -> str:
    """Display name used in tables and figures, e.g. "N_S", "N_tau=0.9", "N_alpha=2^+"."""
    if estimator == "soft":
        return "N_S"
    if estimator == "hard":
        return f"N_tau={tau:g}"
    return f"N_alpha={alpha:g}^+"


def all_counts(kc: Tensor, taus=(), alphas=()) -> dict[str, Tensor]:
    """Every estimator read from one `(N, M)` k^C matrix, computed once.

    Returns:
        {name: (N,) counts} for the soft count, each hard threshold in `taus` and each exponent
        in `alphas` (names from `estimator_name`).
    """
    out = {estimator_name("soft"): soft_count(kc)}
    out.update({estimator_name("hard", tau=t): hard_count(kc, t) for t in taus})
    out.update({estimator_name("positive", alpha=a): positive_count(kc, a) for a in alphas})
    return out
