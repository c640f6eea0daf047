"""Why two inputs are similar: the similarity split over the modules that own the parameters.

Cutting the Jacobian J(x) `(d, p)` into the column blocks J_m(x) of the modules m that directly own
trainable parameters (a module's own parameters form one block) splits the gram matrix into a sum:

    K(x, x') = J(x) J(x')^T = sum_m J_m(x) J_m(x')^T = sum_m K_m(x, x').

Every kernel whose normalisation uses the FULL self-kernels K(x, x) and whose reduction is linear
then splits the same way, each part being the kernel with K(x, x') replaced by K_m(x, x'):

- inner (k^I):        K_m(x, x'); "trace" divides by d.
- influence (k^N):    K_m(x', x) K(x, x)^+; "trace" divides by rank K(x, x).
- correlation (k^C):  K(x, x)^-1/2 K_m(x, x') K(x', x')^-1/2; "trace" divides by
                      sqrt(rank K(x, x) rank K(x', x')). Each part lies in [-1, 1] as well
                      (Cauchy-Schwarz on the blocks of K(x, x)^-1/2 J(x)), and the self-similarity
                      k^C(x, x) = 1 is shared out between the modules.

So for reduce "trace" and "none" the parts of every kind add up to `netsim.similarity` with the same
arguments, to rounding (similarity's exact edges -- k^C clamped to [-1, 1], k^C(x, x) set to exactly
1 -- move it by a few ulps). reduce "rot" (max over 2-D rotations R of Tr(R M), a square root of a
quadratic form in M) is not linear in M, so its parts would not add up: it is refused.
"""

from __future__ import annotations

from itertools import chain, groupby

from torch import Tensor, nn
from tqdm.auto import tqdm

from .engine import JacobianEngine, LayerwiseEngine
from .grads import OutputFn, trainable_parameters
from .kernel import (
    block_rows,
    check_similarity_call,
    data_output_dim,
    engine_chunks,
    engine_for_data,
    kernel_block,
    place_block,
    prepare_columns,
    prepare_rows,
    reduce_block,
)
from .memory import budget_bytes
from .params import ParamSpec

#: The reductions whose per-module parts add up to the reduced kernel (linear in K(x, x')).
ADDITIVE_REDUCTIONS = ("trace", "none")


def module_of(parameter_name: str) -> str:
    """The name (as in `named_modules`) of the module owning a parameter directly ("" for the root)."""
    return parameter_name.rpartition(".")[0]


def parameter_modules(model: nn.Module, params: ParamSpec = None) -> dict[str, list[str]]:
    """{module name: its selected parameter names} (`params` as in `trainable_parameters`), modules in
    `named_modules` order, each module's parameters in `named_parameters` order. A parameter tied
    between modules counts for the first one (`named_parameters` lists it once); modules without a
    selected parameter (all frozen, or left out by `params`) are absent."""
    modules: dict[str, list[str]] = {}
    for name in trainable_parameters(model, params):
        modules.setdefault(module_of(name), []).append(name)
    return modules


def jacobian_layout(model: nn.Module, params: ParamSpec) -> dict[str, slice]:
    """{module: its columns of the `(n, d, p)` Jacobians}: `named_parameters` visits the modules one by
    one, so each module's parameters are contiguous columns."""
    layout, offset = {}, 0
    for name, p in trainable_parameters(model, params).items():
        module = module_of(name)
        start = layout[module].start if module in layout else offset
        offset += p.numel()
        layout[module] = slice(start, offset)
    return layout


def layerwise_layout(factors: list) -> dict[str, list[int]]:
    """{module: the indices of its layer-wise factors}, read from one chunk's factors' parameter names
    (the normalised factors no longer carry them)."""
    layout: dict[str, list[int]] = {}
    for i, f in enumerate(factors):
        owners = sorted({module_of(name) for name in f.names})
        if len(owners) != 1:
            raise ValueError(f"a layer-wise factor holds the parameters of several modules {owners}, which "
                             "cannot be told apart: pass method='jacobian'")
        layout.setdefault(owners[0], []).append(i)
    return layout


class _ColumnViews:
    """`JacobianEngine.gram` on column views J[:, :, a:b], without copying them: reshaping a view to
    `(n, d (b - a))` for the trace would copy it (twice the row block's memory, measured 1.4x the time
    of `similarity` on a 27k-parameter CNN); d GEMMs on its strided rows cost what one GEMM does."""

    @staticmethod
    def gram(rx: Tensor, ry: Tensor, trace: bool) -> Tensor:
        if not trace:  # the (n d, b - a) reshapes of a column view are views
            return JacobianEngine.gram(rx, ry, trace)
        total = rx.new_zeros(rx.shape[0], ry.shape[0])
        for a in range(rx.shape[1]):
            total.addmm_(rx[:, a], ry[:, a].T)
        return total


def _split(rep, engine, layout) -> dict[str, object]:
    """{module: its part of a chunk's (prepared) Jacobians}, in the engine's representation (column
    views of the full Jacobians, or the module's layer-wise factors)."""
    if not isinstance(engine, LayerwiseEngine):
        return {m: rep[:, :, cols] for m, cols in layout.items()}
    return {m: [rep[i] for i in indices] for m, indices in layout.items()}


def similarity_by_module(
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
) -> dict[str, Tensor]:
    """Which modules make two inputs similar: `netsim.similarity` split into one term per module.

    The parts add up to `similarity(model, xs, ys, ...)` with the same arguments (to rounding) for every
    kind with reduce "trace" or "none"; see the module docstring for each kind's formula and why
    reduce "rot" cannot be split. The normalisation of k^C and k^N uses the full self-kernels (of the
    parameters `params` selects), so a module's part is its share of the whole similarity, not the
    similarity seen by that module alone.

    Streaming as in `similarity` (same data forms and passes over them, same engines, row blocks
    and kernel blocks within `memory_budget`, column chunks, the upper block triangle only when `ys` is None and the
    kind is symmetric); the per-module grams cost about as much as the one gram of `similarity` in
    all. Every argument is checked before the model runs (a refused call leaves it untouched).

    Args:
        model, xs, ys, kind, output_fn, x_targets, y_targets, chunk_size, memory_budget, rtol,
            on_zero, method, progress, params, targets_key: as in `netsim.similarity`.
        reduce: "trace" or "none" (the additive reductions).

    Returns:
        {module name: `(N, M)` tensor ("trace") or `(N, M, d, d)` ("none")}, one entry per module owning
        a selected parameter directly, in `model.named_modules()` order ("" is the model itself).
        Modules whose parameters are all frozen or left out by `params` are absent.

    Raises:
        ValueError: reduce="rot" (not additive), and every error of `similarity`'s validation.
        ZeroGradientError, NonFiniteError: as in `similarity`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x = torch.randn(6, 2)
        >>> parts = similarity_by_module(net, x)
        >>> list(parts)
        ['0', '2']
        >>> from netsim import similarity
        >>> bool(torch.allclose(sum(parts.values()), similarity(net, x)))
        True
    """
    source_x, source_y = check_similarity_call(
        model, xs, ys, kind=kind, reduce=reduce, x_targets=x_targets, y_targets=y_targets, chunk_size=chunk_size,
        memory_budget=memory_budget, rtol=rtol, on_zero=on_zero, method=method, params=params,
        targets_key=targets_key)
    if reduce not in ADDITIVE_REDUCTIONS:
        raise ValueError(f"reduce={reduce!r} cannot be split by module: the rotation-invariant reduction "
                         "max_R Tr(R M) = sqrt((a + d)^2 + (b - c)^2) is not linear in M, so per-module parts "
                         f"would not add up to the similarity. Use one of {ADDITIVE_REDUCTIONS}.")
    d = data_output_dim(model, source_x, output_fn)
    symmetric = source_y is None and kind != "influence"
    source_y = source_x if source_y is None else source_y
    engine = engine_for_data(model, source_x, output_fn, chunk_size, method, params)
    n, m = source_x.length, source_y.length
    first = next(iter(trainable_parameters(model, params).values()))
    rows_per_block = block_rows(engine, d, first.element_size(), budget_bytes(memory_budget))
    layerwise_engine = isinstance(engine, LayerwiseEngine)
    layout = None if layerwise_engine else jacobian_layout(model, params)
    grams = engine if layerwise_engine else _ColumnViews
    bar = tqdm(total=None, desc=f"k^{kind} by module", unit="sample", disable=not progress)

    def counted(chunks):
        nonlocal layout
        for start, rep in chunks:
            if layout is None:
                layout = layerwise_layout(rep)
            bar.update(engine.size(rep))
            yield start, rep

    out: dict[str, Tensor] = {}
    held = []   # (rows, cols, {module: block}, mirrored) while the data's lengths are unknown (generators)

    def place(rows, cols, blocks, mirrored):
        for name, block in blocks.items():
            if name not in out:
                out[name] = block.new_empty((n, m, *block.shape[2:]))
            place_block(out[name], rows, cols, block, mirrored, reduce)

    def parts(rows, cols, parts_x, parts_y, rank_x, rank_y, mirrored):
        blocks = {name: reduce_block(kernel_block(part_x, parts_y[name], kind, reduce, grams), kind, reduce,
                                     rank_x, rank_y)
                  for name, part_x in parts_x.items()}
        if n is None or m is None:
            held.append((rows, cols, blocks, mirrored))
        else:
            place(rows, cols, blocks, mirrored)

    try:  # one pass over xs for the rows; the columns stream by once per row block
        row_chunks = engine_chunks(engine, source_x, block=rows_per_block)
        for _, group in groupby(counted(row_chunks), key=lambda chunk: chunk[0] // rows_per_block):
            head = next(group)
            r0 = head[0]
            Qx, rank_x = prepare_rows(chain([head], group), engine, kind, rtol, on_zero, r0)  # noqa: B031
            r1 = r0 + engine.size(Qx)
            parts_x = _split(Qx, engine, layout)
            if symmetric:  # the diagonal block from this block's own Jacobians, then the columns right of it
                parts(slice(r0, r1), slice(r0, r1), parts_x, parts_x, rank_x, rank_x, False)
            c_start = r1 if symmetric else 0
            if m is not None and c_start >= m:
                continue
            for c0, rep_y in counted(engine_chunks(engine, source_y, c_start)):
                Qy, rank_y = prepare_columns(rep_y, kind, rtol, on_zero, c0, engine)
                parts(slice(r0, r1), slice(c0, c0 + engine.size(rep_y)), parts_x, _split(Qy, engine, layout),
                      rank_x, rank_y, symmetric)
    finally:
        bar.close()
    if held:
        n, m = max(r.stop for r, _, _, _ in held), max(c.stop for _, c, _, _ in held)
        for block in held:
            place(*block)
    owners = parameter_modules(model, params)
    if set(out) != set(owners):  # the engine's layers must be the parameter owners
        raise RuntimeError(f"the engine's modules {sorted(out)} are not the parameter owners {sorted(owners)}")
    return {name: out[name] for name in owners}
