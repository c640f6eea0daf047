"""One-off measurements beside the sweep: the torch.mm reference rate, the cost of fresh memory,
the per-layer GEMMs of the layer-wise gram, and where the soft density spends its time."""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from flops import GramMeter
from timing import WARMUP, Clock, repeat

GEMM_N = 2048         # size of the square torch.mm reference GEMM
PROFILE_TOP = 12      # functions listed by `profile_soft`; the rest is summed as "other"


def gemm(reps: int) -> dict:
    """CPU seconds and GFLOP/s of a GEMM_N x GEMM_N torch.mm (the reference of the efficiencies)."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    a @ b
    cpu, wall = repeat(lambda: a @ b, max(reps, 3), 1e9)
    t = statistics.median(cpu)
    return {"n": GEMM_N, "seconds": t, "times": cpu, "gflops": 2.0 * GEMM_N ** 3 / t / 1e9,
            "threads": torch.get_num_threads()}


def memory(gb: int) -> dict:
    """Touches `gb` GiB once (so that later measurements do not pay the VM's first touch of
    never-used memory), then measures the cost of page-faulting fresh memory and of rewriting
    already-mapped memory, per GiB. Large fresh tensors pay the first figure on every allocation
    (glibc returns blocks > 32 MiB to the OS on free)."""
    out = {"prefault_gib": gb}
    if gb > 0:
        with Clock() as c:
            x = torch.empty(gb * 2**28)
            x.fill_(0)
        del x
        out["prefault_s"] = c.cpu
    faults, writes = [], []
    for _ in range(3):
        with Clock() as c:
            x = torch.empty(2**28)
            x.fill_(0)
        faults.append(c.cpu)
        with Clock() as c:
            x.fill_(1)
        writes.append(c.cpu)
        del x
    out.update(fault_s_per_gib=statistics.median(faults), write_s_per_gib=statistics.median(writes))
    return out



def gram_layers(b, reps: int) -> dict:
    """Per-layer timing of the operations of `layerwise.gram(F, F, trace=True)` on the factors
    of all N samples (one row block), with their GEMM flops.

    The factors are passed through `layerwise.transform` with identity matrices: the
    normalisation K(x, x)^-1/2 of the similarity only mixes output rows, so this gives the
    normalised factors' shapes, layout and costs without the library's private normaliser.
    """
    from netsim import layerwise
    from netsim.engine import LayerwiseEngine
    engine = LayerwiseEngine(b.model, b.output_fn, b.n)
    rep = layerwise.factorise(b.model, b.inputs, b.output_fn, b.targets)
    Q = layerwise.transform(rep, torch.eye(b.d).expand(b.n, b.d, b.d))
    layers = []
    med = lambda f: statistics.median(repeat(f, max(reps, 3), 1e9)[0])  # noqa: E731
    total_flops = total_t = 0.0
    for i, f in enumerate(Q):
        if isinstance(f, layerwise.DenseFactors):
            continue
        n, d, o = f.delta.shape
        ii = f.x.shape[1]
        tx = med(lambda: f.x @ f.x.T)  # noqa: B023  (timed here, in this iteration)
        dd = f.delta.reshape(n, d * o)
        td = med(lambda: dd @ dd.T)  # noqa: B023
        X = f.x @ f.x.T
        D = dd @ dd.T
        tm = med(lambda: D.mul(X))  # noqa: B023
        fx, fd = 2.0 * n * n * ii, 2.0 * n * n * d * o
        layers.append({"layer": i, "in": ii, "out": o, "x_gemm_s": tx, "x_gemm_gflops": fx / tx / 1e9,
                       "delta_gemm_s": td, "delta_gemm_gflops": fd / td / 1e9, "elementwise_s": tm})
        total_flops += fx + fd
        total_t += tx + td + 2 * tm  # mul_ + add_ (the add into the running total)
    meter = GramMeter()
    try:
        with Clock() as c:
            engine.gram(Q, Q, True)
    finally:
        meter.restore()
    return {"n": b.n, "layers": layers, "sum_gemm_flops": total_flops, "sum_parts_s": total_t,
            "library_gram_s": c.cpu, "library_gram_flops": meter.flops}


def profile_soft(b, top: int = PROFILE_TOP) -> dict:
    """Where `soft_density` (layer-wise engine) spends its CPU time: exclusive CPU time per
    function under cProfile, the library's functions and the torch operations they call (e.g.
    `run_backward`, `matmul`), the `top` largest and the rest as "other".

    Returns:
        {"n", "total_s": CPU seconds of an unprofiled run, "profiled_s": of the profiled run
        (the profiler's overhead included), "parts": {function: exclusive CPU seconds}}.
    """
    import netsim
    options = {"output_fn": b.output_fn, "method": "layerwise"}
    netsim.soft_density(b.model, b.inputs[:WARMUP], targets=None if b.targets is None else b.targets[:WARMUP],
                        **options)
    with Clock() as c:
        netsim.soft_density(b.model, b.inputs, targets=b.targets, **options)
    profiler = cProfile.Profile(time.process_time)
    with Clock() as profiled:
        profiler.runcall(netsim.soft_density, b.model, b.inputs, targets=b.targets, **options)
    exclusive: dict[str, float] = defaultdict(float)
    for (file, _, name), (_, _, own_s, _, _) in pstats.Stats(profiler).stats.items():
        exclusive[_function_label(file, name)] += own_s
    ranked = sorted(exclusive.items(), key=lambda kv: -kv[1])
    parts = dict(ranked[:top])
    parts["other"] = sum(v for _, v in ranked[top:])
    return {"n": b.n, "total_s": c.cpu, "profiled_s": profiled.cpu, "parts": parts}


def _function_label(file: str, name: str) -> str:
    """"netsim.layerwise._conv_rule", "torch: functional.unfold", or a built-in's own name."""
    if file == "~":
        return name  # a built-in, e.g. "<built-in method run_backward of torch._C._EngineBase object ...>"
    parts = Path(file).parts
    if "netsim" in parts:
        return f"netsim.{Path(file).stem}.{name}"
    if "torch" in parts:
        return f"torch: {Path(file).stem}.{name}"
    return f"{Path(file).stem}.{name}"
