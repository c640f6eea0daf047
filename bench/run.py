"""netsim benchmark: per-sample gradients, soft density and similarity vs a training epoch.

    python bench/run.py [--quick] [--only mlp,cnn1m] [--sizes 256,1024] [--out PATH]
    python bench/run.py --one MODEL N TASK        # one measurement, JSON on stdout

What is measured (see bench/README.md for the full protocol):

- epoch: forward + backward of the plain training loss in batches of 128 over the same N
  samples (`bench.models.epoch`; no optimizer step: Adam is NOT included).
- per_sample_grads / soft_density / similarity (k^C, trace, N x N) with netsim's two engines
  (method="layerwise", method="jacobian") and two baselines run in the same session: the naive
  per-sample backward loop (the authors' method) and plain torch.func vmap(grad); the
  baselines materialise G (N x d x p) and then normalise, sum, dot / G G^T.
- the peers of bench/peers.py when the optional `bench` extra is installed (BackPACK, Opacus,
  nngeometry, Captum; listed as "not installed" otherwise): G from BackPACK / Opacus /
  nngeometry's Jacobian, then the same dense steps; the N x N kernel from nngeometry's
  GramMatrix and Captum's TracInCP. Every G and every peer kernel is checked against netsim
  on the first samples (`check` in the row).

Timing: process CPU time (`time.process_time`) with torch.set_num_threads(1) (unless stated),
median of the repetitions (3 full / up to 2 quick; fewer when a run is long, see `--rep-budget`).
Every measurement runs in a fresh process: by default a child forked from this driver, which
imported torch but never ran a torch op (`--isolate spawn` uses `python bench/run.py --one ...`
subprocesses instead). Peak extra memory = ru_maxrss at the end minus the RSS after setup (model
and data built, the method warmed up on 8 samples).

Skips: a configuration whose G (N d p float32) exceeds `--g-limit-gb` is "infeasible" for the
methods that materialise G; any other non-epoch measurement whose projected time exceeds the
cap (`--cap`, 120 s full / 20 s quick) is "skipped (projected X s)". Projections come from a
timed probe on 64 samples, extrapolated linearly for O(N) steps and, for the similarity, with
the engine's own block plan (Jacobian evaluations incl. recomputed columns) plus the gram's
flops at half the measured torch.mm rate (70 % for the dense G G^T baseline).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import math
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402  (imported, never used for compute in the driver: children fork from it)

import models as M  # noqa: E402
import peers as P  # noqa: E402  (imports no peer library: they load in the children that use them)

FULL_SIZES = (1024, 4096, 16384)
QUICK_SIZES = (256, 1024)
TASKS = ("epoch", "grads:jacobian", "grads:layerwise", "soft:layerwise", "soft:jacobian",
         "sim:layerwise", "sim:jacobian", "naive", "vmap", *(f"peer:{m}" for m in P.PEERS))
TASK_NAMES = {"grads": "per_sample_grads", "soft": "soft_density", "sim": "similarity"}
METHOD_NAMES = {"layerwise": "ours: layerwise", "jacobian": "ours: jacobian", "naive": "naive loop",
                "vmap": "torch.func vmap", "epoch": "epoch (ref)", **{m: p.label for m, p in P.PEERS.items()}}
PROBE = 64            # samples of the timed probe used for projections
WARMUP = 8            # samples of the untimed warm-up run
GEMM_N = 2048         # size of the square torch.mm reference GEMM
FAST_RUN, FAST_REPS = 0.1, 7  # runs under 0.1 s CPU are repeated 7 times
GRAM_EFF = 0.5        # assumed gram efficiency vs torch.mm in the similarity projections
DENSE_EFF = 0.7       # same for the dense G G^T of the baselines
CHECK_N = 32          # samples on which every G / peer kernel is compared with netsim
CHECK_RTOL_G = 1e-4   # max |G - G_netsim| / max |G_netsim|
CHECK_ATOL_K = 1e-3   # max |k^C - k^C_netsim| (k^C is unitless, |k^C| <= 1)


# =========================================================================== child side

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Clock:
    """CPU (process) and wall time of one call."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def __enter__(self):
        self._c, self._w = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self._c, time.perf_counter() - self._w


def _repeat(fn, reps: int, budget: float) -> tuple[list[float], list[float]]:
    """Runs fn up to `reps` times; a further repetition only if the total stays within budget."""
    cpu, wall = [], []
    while len(cpu) < max(1, reps):
        if not cpu or cpu[-1] >= FAST_RUN:  # gc.collect costs ~30 ms: not between millisecond runs
            gc.collect()
        with Clock() as c:
            out = fn()
        del out
        cpu.append(c.cpu)
        wall.append(c.wall)
        if len(cpu) == 1 and c.cpu < FAST_RUN:
            reps = max(reps, FAST_REPS)  # millisecond runs: more repetitions for a stable median
        if sum(cpu) + c.cpu > budget:
            break
    return cpu, wall


def _row(task: str, method: str, cpu=None, wall=None, **extra) -> dict:
    row = {"task": task, "method": method, "status": "ok" if cpu else extra.pop("status", "skipped")}
    if cpu:
        row.update(seconds=statistics.median(cpu), wall_s=statistics.median(wall), reps=len(cpu), times=cpu)
    row.update(extra)
    return row


def _engine(b, method: str):
    from netsim.engine import engine_for
    return engine_for(b.model, b.inputs, b.output_fn, b.targets, None, method)


def similarity_plan(b, method: str) -> dict:
    """What `netsim.similarity(b.model, b.inputs)` will execute: row block size, number of
    Jacobian evaluations (rows + streamed columns), sample pairs in the grams, flops per pair.

    Flops per pair (executed, counting a multiply-add as 2): Jacobian engine 2 d p;
    layer-wise engine, summed over layers, Linear(in, out): 2 (in + d out) (the X X^T and
    Delta Delta^T GEMMs; the elementwise product and the sum over layers are not counted),
    a dense (conv / generic) layer with p_l parameters: 2 d p_l.
    """
    from netsim.grads import num_parameters
    from netsim.kernel import DEFAULT_BLOCK_BYTES
    engine = _engine(b, method)
    d, itemsize = b.d, 4
    per_sample = engine.bytes_per_sample(d, itemsize)
    if engine.name == "layerwise":
        from netsim import layerwise
        factors = layerwise.factorise(b.model, b.inputs[:1], b.output_fn, None if b.targets is None else b.targets[:1])
        pair_flops = sum(_layer_pair_flops(f) for f in factors)
    else:
        pair_flops = 2 * d * num_parameters(b.model)
    square = int(math.sqrt(DEFAULT_BLOCK_BYTES / (4 * d * d * itemsize)))
    rows = max(engine.chunk, min(DEFAULT_BLOCK_BYTES // max(per_sample, 1), square))

    def counts(n: int) -> tuple[int, int]:
        evals = pairs = 0
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            evals += (r1 - r0) + (n - r1)
            pairs += (r1 - r0) * (n - r0)
        return evals, pairs

    return {"rows_per_block": rows, "pair_flops": pair_flops, "counts": counts}


def _layer_pair_flops(f) -> int:
    from netsim import layerwise
    if isinstance(f, layerwise.DenseFactors):
        return 2 * f.grads.shape[1] * f.grads.shape[2]
    return 2 * ((f.x.shape[1] if f.weight else 0) + f.delta.shape[1] * f.delta.shape[2])


def _gram_flops(fx, fy) -> float:
    """Executed GEMM flops of one `layerwise.gram(fx, fy)` call (see `similarity_plan`)."""
    from netsim import layerwise
    total = 0.0
    for a, b in zip(fx, fy):
        nx = a.grads.shape[0] if isinstance(a, layerwise.DenseFactors) else a.x.shape[0]
        ny = b.grads.shape[0] if isinstance(b, layerwise.DenseFactors) else b.x.shape[0]
        total += nx * ny * _layer_pair_flops(a)
    return total


class GramMeter:
    """Wraps the engines' `gram` to accumulate its CPU time and executed flops."""

    def __init__(self):
        self.seconds, self.flops, self.calls = 0.0, 0.0, 0
        from netsim.engine import JacobianEngine, LayerwiseEngine
        lw, jac = LayerwiseEngine.gram, JacobianEngine.gram

        def lw_gram(rx, ry, trace):
            self.flops += _gram_flops(rx, ry)
            return self._timed(lw, rx, ry, trace)

        def jac_gram(rx, ry, trace):
            self.flops += 2.0 * rx.shape[0] * ry.shape[0] * rx.shape[1] * rx.shape[2]
            return self._timed(jac, rx, ry, trace)

        self._originals = (lw, jac)
        LayerwiseEngine.gram = staticmethod(lw_gram)
        JacobianEngine.gram = staticmethod(jac_gram)

    def restore(self):
        from netsim.engine import JacobianEngine, LayerwiseEngine
        LayerwiseEngine.gram, JacobianEngine.gram = (staticmethod(f) for f in self._originals)

    def _timed(self, fn, *args):
        t0 = time.process_time()
        out = fn(*args)
        self.seconds += time.process_time() - t0
        self.calls += 1
        return out

    def reset(self):
        self.seconds, self.flops, self.calls = 0.0, 0.0, 0


def _g_bytes(b) -> int:
    from netsim.grads import num_parameters
    return b.n * b.d * num_parameters(b.model) * 4


def check_grads(b, G) -> dict:
    """Compares the first rows of a materialised `(N, d, p)` G with `netsim.per_sample_grads`
    (4 samples at a time: the check must not raise the measurement's peak memory)."""
    import netsim
    m = min(b.n, CHECK_N)
    diff = scale = 0.0
    for start in range(0, m, 4):
        stop = min(m, start + 4)
        x, t = b.inputs[start:stop], None if b.targets is None else b.targets[start:stop]
        ref = netsim.per_sample_grads(b.model, x, output_fn=b.output_fn, targets=t)
        diff = max(diff, (G[start:start + ref.shape[0]] - ref).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    err = diff / max(scale, 1e-30)
    return {"against": "netsim.per_sample_grads", "n": m, "max_rel_err": err, "ok": err <= CHECK_RTOL_G}


def check_similarity(b, kc) -> dict:
    """Compares the leading block of an N x N k^C with `netsim.similarity` on those samples."""
    m = min(b.n, CHECK_N)
    ref = M.ours_similarity(b.subset(m), "auto")
    err = (kc[:m, :m] - ref).abs().max().item()
    return {"against": "netsim.similarity", "n": m, "max_abs_err": err, "ok": err <= CHECK_ATOL_K}


def _checked(row: dict, check: dict | None) -> dict:
    """Attaches the check; a result that differs from netsim's is not reported as ok."""
    if check is not None:
        row["check"] = check
        if not check["ok"] and row["status"] == "ok":
            err = check.get("max_rel_err", check.get("max_abs_err"))
            row["status"] = f"mismatch: differs from {check['against']} by {err:.2g}"
    return row


def child_measure(model: str, n: int, task: str, *, cap: float, reps: int, rep_budget: float,
                  threads: int = 1, mm_gflops: float = 30.0) -> dict:
    """One measurement in this (fresh) process. Returns {"rows": [...], ...}."""
    from netsim_paper import runtime
    runtime.configure_threads(threads)
    torch.manual_seed(0)
    if task == "gemm":
        return _gemm(reps)
    if task == "memory":
        return _memory(n)
    b = M.make_bench(model, n)
    if task == "gram_layers":
        return _gram_layers(b, reps)
    if task == "profile:soft":
        return _profile_soft(b)
    # warm torch up: a matmul, then the method itself on a few samples (untimed)
    torch.ones(64, 64) @ torch.ones(64, 64)
    run, project, rows_from = _task(task, b, mm_gflops)
    run(b.subset(min(n, WARMUP)))
    gc.collect()
    rss0 = _rss_mb()
    projected = None
    if task != "epoch" and n > PROBE:
        projected = project(b.subset(PROBE), n)
    result = rows_from(run, projected, cap, reps, rep_budget, rss0)
    from netsim.grads import num_parameters
    return {"rows": result, "rss_setup_mb": rss0, "threads": threads, "loadavg": os.getloadavg(),
            "params": num_parameters(b.model), "d": b.d}


def _task(task: str, b, mm_gflops: float):
    """(run(bench), project(probe_bench, n) -> seconds or dict, rows_from(...)) for a task."""
    kind, _, method = task.partition(":")
    rate = mm_gflops * 1e9

    def timed_probe(fn, probe):
        gc.collect()
        with Clock() as c:
            fn(probe)
        return c.cpu

    if task == "epoch":
        def rows_from(run, projected, cap, reps, rep_budget, rss0):
            cpu, wall = _repeat(lambda: run(b), reps, rep_budget)
            return [_row("epoch", "epoch", cpu, wall, peak_extra_mb=max(0.0, _maxrss_mb() - rss0))]
        return M.epoch, None, rows_from

    if kind in ("grads", "soft", "sim"):
        fn = {"grads": (M.ours_grads if method == "jacobian" else M.layerwise_grads),
              "soft": lambda bb: M.ours_soft_density(bb, method),
              "sim": lambda bb: M.ours_similarity(bb, method)}[kind]
        meter = GramMeter() if kind == "sim" else None

        def project(probe, n):
            t = timed_probe(fn, probe)
            if kind != "sim":
                return t * n / probe.n
            plan = similarity_plan(b, method)
            ev_p, pairs_p = plan["counts"](probe.n)
            ev, pairs = plan["counts"](n)
            return t / ev_p * ev + pairs * plan["pair_flops"] / (GRAM_EFF * rate)

        def rows_from(run, projected, cap, reps, rep_budget, rss0):
            extra = {"projected_s": projected}
            if kind == "sim":
                plan = similarity_plan(b, method)
                evals, pairs = plan["counts"](b.n)
                extra.update(rows_per_block=plan["rows_per_block"], jacobian_evals=evals, gram_pairs=pairs)
            if projected is not None and projected > cap:
                return [_row(TASK_NAMES[kind], method, status="skipped", **extra)]
            if meter:
                meter.reset()
            cpu, wall = _repeat(lambda: fn(b), reps, rep_budget)
            extra["peak_extra_mb"] = max(0.0, _maxrss_mb() - rss0)
            if meter and meter.calls:
                extra.update(gram_seconds=meter.seconds / len(cpu), gram_flops=meter.flops / len(cpu))
                extra["gram_gflops"] = extra["gram_flops"] / max(extra["gram_seconds"], 1e-9) / 1e9
            return [_row(TASK_NAMES[kind], method, cpu, wall, **extra)]
        return fn, project, rows_from

    prepared = None
    if kind == "peer":
        prepared = P.prepare(method, b)
        extra_info = {k: v for k, v in (("variant", prepared.variant), ("as_given_error", prepared.as_given_error),
                                        ("captum_mode", prepared.mode)) if v is not None}
        if prepared.kind == "gram":
            return _gram_peer_task(b, prepared, extra_info, rate)

    if task in ("naive", "vmap") or prepared is not None:
        build = M.naive_grads if task == "naive" else M.vmap_grads if task == "vmap" else P.quiet(prepared.run)
        name = task if prepared is None else method
        info = {} if prepared is None else extra_info

        def run_small(bb):
            M.dense_soft_density(build(bb))
            M.dense_similarity(build(bb))

        def project(probe, n):
            tG = timed_probe(build, probe) * n / probe.n
            p = sum(q.numel() for q in probe.model.parameters() if q.requires_grad)
            return {"grads": tG, "soft": tG * 1.02, "sim": tG + 2.0 * n * n * probe.d * p / (DENSE_EFF * rate)}

        def rows_from(run, projected, cap, reps, rep_budget, rss0):
            projected = projected or {}
            do_sim = projected.get("sim", 0) <= cap
            if projected.get("grads", 0) > cap:
                return [_row(TASK_NAMES[k], name, status="skipped", projected_s=projected[k], **info)
                        for k in ("grads", "soft", "sim")]
            times = defaultdict(list)
            walls = defaultdict(list)
            peaks = {}
            check = None
            for rep in range(max(1, reps)):
                gc.collect()
                with Clock() as cg:
                    G = build(b)
                peaks.setdefault("grads", max(0.0, _maxrss_mb() - rss0))
                if check is None:  # untimed: the first rows against netsim
                    check = check_grads(b, G)
                with Clock() as cn:
                    Q = M.dense_normalise(G)
                with Clock() as cs:
                    ns = M.dense_soft(Q)
                del ns
                peaks.setdefault("soft", max(0.0, _maxrss_mb() - rss0))
                times["grads"].append(cg.cpu)
                walls["grads"].append(cg.wall)
                times["soft"].append(cg.cpu + cn.cpu + cs.cpu)
                walls["soft"].append(cg.wall + cn.wall + cs.wall)
                if do_sim:
                    with Clock() as ck:
                        K = M.dense_sim(Q)
                    del K
                    peaks.setdefault("sim", max(0.0, _maxrss_mb() - rss0))
                    times["sim"].append(cg.cpu + cn.cpu + ck.cpu)
                    walls["sim"].append(cg.wall + cn.wall + ck.wall)
                del G, Q
                total = times["sim"] if do_sim else times["soft"]
                if sum(total) + total[-1] > rep_budget:
                    break
            out = []
            for k in ("grads", "soft", "sim"):
                if times[k]:
                    out.append(_checked(_row(TASK_NAMES[k], name, times[k], walls[k], peak_extra_mb=peaks[k],
                                             projected_s=projected.get(k), **info,
                                             note="G built once per rep; soft/sim times include building G"), check))
                else:
                    out.append(_row(TASK_NAMES[k], name, status="skipped", projected_s=projected.get(k), **info))
            return out
        return run_small, project, rows_from
    raise ValueError(f"unknown task {task!r}")


def _gram_peer_task(b, prepared, info: dict, rate: float):
    """A peer that returns the N x N kernel (nngeometry GramMatrix, Captum TracInCP): timed
    from the inputs to k^C (the peer's raw gram normalised by its diagonal blocks)."""
    run_peer = P.quiet(prepared.run)

    def run(bb):
        return M.correlation_from_gram(run_peer(bb))

    def project(probe, n):
        gc.collect()
        with Clock() as c:
            run(probe)
        # batch passes scale with the batch size up to PEER_BATCH, then with their count
        unit = c.cpu * min(n, P.PEER_BATCH) / probe.n / P.gram_passes(prepared.method, probe.n, probe.d)
        p = sum(q.numel() for q in probe.model.parameters() if q.requires_grad)
        gemm = 2.0 * n * n * probe.d * (probe.d + 1) / 2 * p / (DENSE_EFF * rate)
        return unit * P.gram_passes(prepared.method, n, probe.d) + gemm

    def rows_from(_run, projected, cap, reps, rep_budget, rss0):
        if projected is not None and projected > cap:
            return [_row("similarity", prepared.method, status="skipped", projected_s=projected, **info)]
        cpu, wall, check, peak = [], [], None, None
        for _ in range(max(1, reps)):
            gc.collect()
            with Clock() as c:
                kc = run(b)
            cpu.append(c.cpu)
            wall.append(c.wall)
            if check is None:
                peak = max(0.0, _maxrss_mb() - rss0)
                check = check_similarity(b, kc)
            del kc
            if sum(cpu) + cpu[-1] > rep_budget:
                break
        return [_checked(_row("similarity", prepared.method, cpu, wall, peak_extra_mb=peak,
                              projected_s=projected, **info), check)]
    return run, project, rows_from


def _gemm(reps: int) -> dict:
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    a @ b
    cpu, wall = _repeat(lambda: a @ b, max(reps, 3), 1e9)
    t = statistics.median(cpu)
    return {"n": GEMM_N, "seconds": t, "times": cpu, "gflops": 2.0 * GEMM_N ** 3 / t / 1e9,
            "threads": torch.get_num_threads()}


def _memory(gb: int) -> dict:
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


def _gram_layers(b, reps: int) -> dict:
    """Per-layer timing of the operations of `layerwise.gram(F, F, trace=True)` on the
    normalised factors of all N samples (one row block), with their GEMM flops."""
    from netsim import layerwise
    from netsim.density import _normalised
    from netsim.engine import LayerwiseEngine
    engine = LayerwiseEngine(b.model, b.output_fn, b.n)
    rep = layerwise.factorise(b.model, b.inputs, b.output_fn, b.targets)
    Q = _normalised(engine, rep, None, "raise", 0)
    layers = []
    med = lambda f: statistics.median(_repeat(f, max(reps, 3), 1e9)[0])  # noqa: E731
    total_flops = total_t = 0.0
    for i, f in enumerate(Q):
        if isinstance(f, layerwise.DenseFactors):
            continue
        n, d, o = f.delta.shape
        ii = f.x.shape[1]
        tx = med(lambda: f.x @ f.x.T)
        dd = f.delta.reshape(n, d * o)
        td = med(lambda: dd @ dd.T)
        X = f.x @ f.x.T
        D = dd @ dd.T
        tm = med(lambda: D.mul(X))
        fx, fd = 2.0 * n * n * ii, 2.0 * n * n * d * o
        layers.append({"layer": i, "in": ii, "out": o, "x_gemm_s": tx, "x_gemm_gflops": fx / tx / 1e9,
                       "delta_gemm_s": td, "delta_gemm_gflops": fd / td / 1e9, "elementwise_s": tm})
        total_flops += fx + fd
        total_t += tx + td + 2 * tm  # mul_ + add_ (the add into the running total)
    meter = GramMeter()
    with Clock() as c:
        engine.gram(Q, Q, True)
    return {"n": b.n, "layers": layers, "sum_gemm_flops": total_flops, "sum_parts_s": total_t,
            "library_gram_s": c.cpu, "library_gram_flops": meter.flops}


def _profile_soft(b) -> dict:
    """Where soft_density (layer-wise engine) spends its CPU time: exclusive time per step."""
    import netsim
    from netsim import density, layerwise
    from netsim.engine import LayerwiseEngine
    excl: dict[str, float] = defaultdict(float)
    stack: list[float] = []

    def wrap(name, fn):
        def w(*a, **k):
            t0 = time.process_time()
            stack.append(0.0)
            try:
                return fn(*a, **k)
            finally:
                el = time.process_time() - t0
                excl[name] += el - stack.pop()
                if stack:
                    stack[-1] += el
        return w

    def patch(owner, attr, label):
        """Wraps owner.attr if it exists (the library evolves; missing steps are just absent)."""
        if not hasattr(owner, attr):
            return
        raw = inspect.getattr_static(owner, attr)
        if isinstance(raw, staticmethod):
            setattr(owner, attr, staticmethod(wrap(label, raw.__func__)))
        else:
            setattr(owner, attr, wrap(label, raw))

    patch(layerwise, "factorise", "factorise: other (stack, hooks, checks)")
    patch(layerwise, "_record", "forward (hooked)")
    patch(torch.autograd, "grad", "backward (autograd.grad to layer outputs)")
    names = {torch.nn.Linear: "linear rule (factors)", torch.nn.Conv2d: "conv rule (unfold + einsum)"}
    for k, fn in list(layerwise._RULES.items()):
        layerwise._RULES[k] = wrap(names.get(k, str(k)), fn)
    patch(layerwise, "_generic_rule", "generic rule (vmap vjp, e.g. PReLU)")
    for op in ("self_gram", "transform", "summed", "add_sums", "dot_with_sums", "tangent"):
        patch(LayerwiseEngine, op, op)
    patch(density, "psd_power", "psd_power (d x d eigh)")
    patch(density, "output_jvp", "second pass: output_jvp (forward-mode jvp)")
    patch(density, "_normalised", "normalise: other")
    netsim.soft_density(b.model, b.inputs[:WARMUP], output_fn=b.output_fn,
                        targets=None if b.targets is None else b.targets[:WARMUP], method="layerwise")
    excl.clear()
    with Clock() as c:
        netsim.soft_density(b.model, b.inputs, output_fn=b.output_fn, targets=b.targets, method="layerwise")
    parts = dict(sorted(excl.items(), key=lambda kv: -kv[1]))
    parts["other (python, engine_for probe, cat)"] = c.cpu - sum(excl.values())
    return {"n": b.n, "total_s": c.cpu, "parts": parts}


# =========================================================================== driver side

def run_isolated(spec: dict, isolate: str, timeout: float) -> dict:
    """Runs child_measure(**spec) in a fresh process; {"error": ...} on failure or timeout."""
    if isolate == "spawn":
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", spec["model"] or "-", str(spec["n"]), spec["task"],
               "--cap", str(spec["cap"]), "--reps", str(spec["reps"]), "--rep-budget", str(spec["rep_budget"]),
               "--threads", str(spec["threads"]), "--mm-gflops", str(spec["mm_gflops"])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out (> {timeout:.0f} s wall)"}
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, send JSON, exit without running the parent's cleanup
        os.close(r)
        code = 0
        try:
            res = child_measure(**spec)
        except BaseException as err:  # noqa: BLE001  reported to the driver
            res, code = {"error": f"{type(err).__name__}: {err}"[:500]}, 1
        try:
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(res).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"error": f"timed out (> {timeout:.0f} s wall)"}
            ready, _, _ = select.select([f], [], [], min(left, 5.0))
            if ready:
                data = os.read(f.fileno(), 1 << 16)
                if not data:
                    break
                chunks.append(data)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"child died (status {status})"}
    return json.loads(b"".join(chunks).decode())


def library_state() -> dict:
    """Which library code was measured: git HEAD, whether lib/ has uncommitted changes, and a
    hash of the lib/netsim sources (the engine evolves while the bench is run)."""
    root = HERE.parent
    h = hashlib.sha256()
    for f in sorted((root / "lib" / "netsim").rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    state = {"lib_sha256": h.hexdigest()[:16]}
    try:
        state["git_head"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        state["lib_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "lib"], cwd=root,
                                                 capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg())}


def _fmt_s(x) -> str:
    return "—" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def row_cells(r: dict) -> tuple[str, str, str, str]:
    """(seconds, x epoch, peak MB, status) cells of a result row."""
    if r["status"] == "ok":
        return _fmt_s(r["seconds"]), ("—" if r.get("x_epoch") is None else f"{r['x_epoch']:.3g}"), \
            f"{r.get('peak_extra_mb', 0):.0f}", "ok"
    if r["status"] == "infeasible":
        return "—", "—", "—", f"infeasible (G needs {r['needs_gb']:.1f} GB)"
    if r["status"] == "skipped":
        proj = r.get("projected_s")
        why = r.get("reason") or (f"projected {proj:.0f} s" if proj is not None else "")
        return "—", "—", "—", f"skipped ({why})"
    return "—", "—", "—", r["status"]


def method_label(r: dict) -> str:
    label = METHOD_NAMES.get(r["method"], r["method"])
    variants = [v for v in (r.get("captum_mode"), r.get("variant")) if v]
    return f"{label} ({'; '.join(variants)})" if variants else label


def print_table(results: dict) -> None:
    hdr = f"{'model':12s} {'N':>6s} {'task':17s} {'method':24s} {'seconds':>8s} {'x epoch':>8s} {'peak MB':>8s}  status"
    print(hdr)
    print("-" * len(hdr))
    for r in results["results"]:
        s, x, mb, st = row_cells(r)
        print(f"{r['model']:12s} {r['n'] if r['n'] else '':>6} {r['task']:17s} {method_label(r):24s} "
              f"{s:>8s} {x:>8s} {mb:>8s}  {st}")
    peers = results.get("peers") or {}
    if peers:
        print("\npeers: " + "; ".join(f"{k}: {v}" for k, v in peers.items()))


def merge_results(old: dict, new: dict) -> dict:
    """`new` plus whatever `old` measured that `new` did not: result rows keyed by (model, N,
    task, method) in old's order, new ones appended; extras kept from old where new has none."""
    key = lambda r: (r["model"], r["n"], r["task"], r["method"])  # noqa: E731
    for r in old.get("results", []):
        r.setdefault("lib", (old.get("library") or {}).get("lib_sha256"))
        if r.get("status") == "ok" and r.get("x_epoch") and "epoch_s" not in r:
            r["epoch_s"] = r["seconds"] / r["x_epoch"]  # the epoch it was measured against
    fresh = {key(r): r for r in new["results"]}
    rows = [fresh.pop(key(r), r) for r in old.get("results", [])]
    rows += [r for r in new["results"] if key(r) in fresh]
    out = dict(new, results=rows)
    out["models"] = {**old.get("models", {}), **new.get("models", {})}
    for k in ("settings", "memory"):  # the base run's protocol; the later run's is in "merged"
        if old.get(k):
            out[k] = old[k]
    for k in ("threads", "threads_summary", "soft_density_profile", "gram_layers_mlp"):
        if not new.get(k) and old.get(k):
            out[k] = old[k]
    # the GEMM-efficiency goal is read at the largest N measured (a small-N gram fits in cache)
    eff_old, eff_new = old.get("gemm_efficiency"), new.get("gemm_efficiency")
    if eff_old and (not eff_new or (eff_old.get("n") or 0) > (eff_new.get("n") or 0)):
        out["gemm_efficiency"] = eff_old
    if out.get("gemm_efficiency") is old.get("gemm_efficiency") and old.get("gemm"):
        out["gemm"] = old["gemm"]  # the efficiency was computed against that torch.mm rate
    out["soft_density_profile"] = {**old.get("soft_density_profile", {}), **new.get("soft_density_profile", {})}
    out["timeline"] = old.get("timeline", []) + new.get("timeline", [])
    for k, v in old.items():  # what only the earlier file has (e.g. `budgets` from bench/budgets.py)
        out.setdefault(k, v)
    out["merged"] = old.get("merged", []) + [{"date": old.get("date"), "mode": old.get("mode"),
                                               "library": old.get("library"),
                                               "wall_time_s": old.get("wall_time_s"),
                                               "later_run_settings": new.get("settings")}]
    modes = str(old.get("mode")).split("+")
    out["mode"] = "+".join(modes + [new.get("mode")] if new.get("mode") not in modes else modes)
    return recompute_ratios(out)


def recompute_ratios(res: dict) -> dict:
    """x_epoch of every ok row against the epoch measured in the row's own run (`epoch_s`), or,
    for a row without one, against the epoch row of its (model, N)."""
    epochs = {(r["model"], r["n"]): r["seconds"] for r in res["results"]
              if r["task"] == "epoch" and r["status"] == "ok"}
    for r in res["results"]:
        ref = r.get("epoch_s") or epochs.get((r["model"], r["n"]))
        if r["status"] == "ok" and ref:
            r["x_epoch"] = r["seconds"] / ref
    return res


def evaluate_goals(res: dict) -> list[dict]:
    goals = []
    rows = [r for r in res["results"] if r["status"] == "ok"]
    quick = res["mode"] == "quick"
    for model in res["models"]:
        if not res["models"][model]["available"]:
            continue
        soft = [r for r in rows if r["model"] == model and r["task"] == "soft_density"
                and r["method"] == "layerwise" and r.get("x_epoch") is not None]
        if not soft:
            goals.append({"goal": f"soft_density <= 3x epoch ({model})", "target": 3.0, "measured": None,
                          "met": False, "note": "not measured"})
            continue
        r = max(soft, key=lambda r: r["n"])
        goals.append({"goal": f"soft_density <= 3x epoch ({model})", "target": 3.0, "measured": r["x_epoch"],
                      "met": r["x_epoch"] <= 3.0, "n": r["n"],
                      "note": "layer-wise engine (what method='auto' picks), largest N measured"})
    if "cnn1m" in res["models"]:
        sim = [r for r in res["results"] if r["model"] == "cnn1m" and r["task"] == "similarity"
               and r["method"] == "layerwise"]
        ok = [r for r in sim if r["status"] == "ok" and r.get("x_epoch") is not None]
        at = [r for r in ok if r["n"] == 4096]
        g = {"goal": "similarity (N x N) of the >=1M CNN at N=4096 <= 10x epoch", "target": 10.0}
        if at:
            g.update(measured=at[0]["x_epoch"], met=at[0]["x_epoch"] <= 10.0, n=4096, note="layer-wise engine")
        elif ok:
            r = max(ok, key=lambda r: r["n"])
            g.update(measured=r["x_epoch"], met=r["x_epoch"] <= 10.0, n=r["n"],
                     note=f"FLAGGED: measured at N={r['n']}, not 4096 ({'quick mode' if quick else 'largest feasible'})")
        else:
            skipped = [r for r in sim if r["n"] == 4096 and r.get("projected_s")]
            g.update(measured=None, met=False, note="not measured" + (
                f" (projected {skipped[0]['projected_s']:.0f} s)" if skipped else ""))
        goals.append(g)
    eff = res.get("gemm_efficiency")
    g = {"goal": "gram GEMM efficiency of the layer-wise similarity (MLP) >= 60% of torch.mm", "target": 0.6}
    if eff and eff.get("efficiency") is not None:
        g.update(measured=eff["efficiency"], met=eff["efficiency"] >= 0.6, n=eff["n"],
                 note="executed GEMM flops of layerwise.gram / its CPU time, vs a "
                      f"{GEMM_N}^2 torch.mm, 1 thread")
    else:
        g.update(measured=None, met=False, note="not measured (needs the MLP similarity)")
    goals.append(g)
    return goals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"N in {QUICK_SIZES}, fewer reps, cap 20 s")
    ap.add_argument("--only", default=None, help="comma-separated models (default: all)")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default: full or quick set)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--cap", type=float, default=None, help="per-measurement cap on projected CPU s (120 / 20 quick)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (3 / 2 quick)")
    ap.add_argument("--rep-budget", type=float, default=None,
                    help="no further repetition once the total would pass this many CPU s (60 / 4 quick)")
    ap.add_argument("--budget", type=float, default=None,
                    help="wall-clock budget of the whole run in s (default 1500 / 280 quick); later "
                         "measurements are skipped once it is spent")
    ap.add_argument("--g-limit-gb", type=float, default=4.0)
    ap.add_argument("--isolate", choices=("fork", "spawn"), default="fork")
    ap.add_argument("--prefault-gb", type=int, default=None,
                    help="GiB touched once before measuring (VM first-touch cost; default 6 full / 3 quick)")
    ap.add_argument("--no-extras", action="store_true", help="skip the thread, profile and gram-layer runs")
    ap.add_argument("--tasks", default=None,
                    help=f"comma-separated subset of {','.join(TASKS[1:])} (the epoch always runs)")
    ap.add_argument("--merge", type=Path, default=None,
                    help="an earlier results.json: its rows and extras are kept unless this run re-measures "
                         "them (same model, N, task, method); goals are re-evaluated on the union")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "N", "TASK"), help="one measurement, JSON on stdout")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mm-gflops", type=float, default=30.0)
    args = ap.parse_args(argv)
    quick = args.quick
    cap = args.cap if args.cap is not None else (20.0 if quick else 120.0)
    reps = args.reps if args.reps is not None else (2 if quick else 3)
    rep_budget = args.rep_budget if args.rep_budget is not None else (4.0 if quick else 60.0)

    if args.one:
        model, n, task = args.one
        res = child_measure(None if model == "-" else model, int(n), task, cap=cap, reps=reps, rep_budget=rep_budget,
                            threads=args.threads, mm_gflops=args.mm_gflops)
        print(json.dumps(res))
        return 0

    if args.prefault_gb is None:
        args.prefault_gb = 3 if quick else 6
    t_start = time.perf_counter()
    budget = args.budget if args.budget is not None else (280.0 if quick else 1400.0)
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (QUICK_SIZES if quick else FULL_SIZES)
    names = args.only.split(",") if args.only else list(M.MODELS)
    tasks = [t for t in TASKS[1:] if args.tasks is None or t in args.tasks.split(",")]
    if args.tasks and len(tasks) != len(args.tasks.split(",")):
        ap.error(f"--tasks: choose from {list(TASKS[1:])}")
    absent = [t for t in tasks if t.startswith("peer:") and not P.installed(t.partition(":")[2])]
    tasks = [t for t in tasks if t not in absent]
    for nm in names:
        if nm not in M.MODELS:
            ap.error(f"unknown model {nm!r}; choose from {list(M.MODELS)}")
    res = {"mode": "quick" if quick else "full", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(), "library": library_state(),
           "settings": {"sizes": list(sizes), "reps": reps, "rep_budget_s": rep_budget, "cap_s": cap,
                        "g_limit_gb": args.g_limit_gb, "threads": 1, "isolate": args.isolate,
                        "timing": "process CPU time (time.process_time), median of reps, torch.set_num_threads(1)",
                        "epoch": "forward + backward of the plain loss, batch 128 over the N samples; "
                                 "optimizer (Adam) step NOT included",
                        "peak_extra_mb": "ru_maxrss at the end minus RSS after setup (model, data, warm-up)",
                        "projection": "timed 64-sample probe; similarity: engine block plan + gram flops at "
                                      f"{GRAM_EFF:.0%} of torch.mm ({DENSE_EFF:.0%} for dense G G^T)"},
           "models": {}, "results": [], "threads": [], "peers": {}, "timeline": []}

    reserve = 0.0 if args.no_extras else (40.0 if quick else 240.0)  # wall s kept for the extras

    def spend_ok(keep: float = 0.0) -> bool:
        return time.perf_counter() - t_start < budget - keep

    def spawn(model, n, task, *, threads=1, cap_=cap, reps_=reps):
        spec = dict(model=model, n=n, task=task, cap=cap_, reps=reps_, rep_budget=rep_budget, threads=threads,
                    mm_gflops=res.get("gemm", {}).get("gflops", 30.0))
        left = budget - (time.perf_counter() - t_start)
        timeout = max(60.0, min(3 * cap_ * max(1, reps_) + 120, left + 120))
        t0 = time.perf_counter()
        out = run_isolated(spec, args.isolate, timeout)
        res["timeline"].append({"model": model, "n": n, "task": task, "threads": threads,
                                "wall_s": round(time.perf_counter() - t0, 2)})
        return out

    print(f"netsim bench ({res['mode']}): sizes {sizes}, cap {cap:.0f} s, reps {reps}, models {names}", flush=True)
    res["peers"] = P.status()
    if absent:
        print(f"peers not installed, not timed: {', '.join(t.partition(':')[2] for t in absent)} ({P.INSTALL_HINT})",
              flush=True)
    res["memory"] = spawn(None, args.prefault_gb, "memory", cap_=1e9)
    m = res["memory"]
    if "fault_s_per_gib" in m:
        print(f"memory: prefault {m.get('prefault_gib')} GiB in {m.get('prefault_s', 0):.1f} s; fresh pages "
              f"{m['fault_s_per_gib']:.2f} s/GiB, rewrite {m['write_s_per_gib']:.2f} s/GiB (CPU)", flush=True)
    gemm = spawn(None, 0, "gemm")
    res["gemm"] = gemm
    if "gflops" in gemm:
        print(f"torch.mm {GEMM_N}^2, 1 thread: {gemm['gflops']:.1f} GFLOP/s", flush=True)

    skipped_at: dict[tuple[str, str], tuple[int, float | None]] = {}
    failed_at: dict[tuple[str, str], tuple[int, str]] = {}  # a peer that cannot handle a model
    for model in names:
        available = M.MODELS[model] is not None
        res["models"][model] = {"available": available, "description": M.DESCRIPTIONS[model]}
        if not available:
            res["results"].append({"model": model, "n": None, "task": "—", "method": "—",
                                   "status": "not yet available"})
            continue
        for n in sizes:
            if not spend_ok(reserve):
                res["results"].append({"model": model, "n": n, "task": "all", "method": "—",
                                       "status": "skipped", "reason": "time budget spent"})
                continue
            ep = spawn(model, n, "epoch")
            if "error" in ep:
                res["results"].append({"model": model, "n": n, "task": "epoch", "method": "epoch",
                                       "status": f"error: {ep['error']}"})
                continue
            ep_row = ep["rows"][0]
            ep_row.update(model=model, n=n, x_epoch=1.0, epoch_s=ep_row["seconds"])
            res["results"].append(ep_row)
            t_epoch = ep_row["seconds"]
            print(f"{model} N={n}: epoch {t_epoch:.3g} s", flush=True)
            p = ep["params"]  # the driver never builds a model: no torch op before a fork
            res["models"][model]["params"] = p
            d = ep.get("d", 1)
            res["models"][model]["d"] = d
            g_bytes = n * d * p * 4
            for task in tasks:
                kind, _, method = task.partition(":")
                gram_peer = kind == "peer" and P.PEERS[method].kind == "gram"
                builds_g = task in ("naive", "vmap") or (kind == "peer" and not gram_peer)
                # Captum keeps the test Jacobians of all N samples: as much memory as G
                materialises = kind == "grads" or builds_g or method == "captum"
                out_tasks = [TASK_NAMES[k] for k in ("grads", "soft", "sim")] if builds_g \
                    else ["similarity"] if gram_peer else [TASK_NAMES[kind]]
                meth = method or task
                if (model, task) in failed_at:  # the same failure at every N: not spawned again
                    n0, err = failed_at[(model, task)]
                    for t in out_tasks:
                        res["results"].append({"model": model, "n": n, "task": t, "method": meth,
                                               "status": f"error: {err}", "reason": f"as at N={n0}"})
                    continue
                if materialises and g_bytes > args.g_limit_gb * 1e9:
                    for t in out_tasks:
                        res["results"].append({"model": model, "n": n, "task": t, "method": meth,
                                               "status": "infeasible", "needs_gb": g_bytes / 1e9})
                    continue
                prev = skipped_at.get((model, task))
                if prev is not None or not spend_ok(reserve):
                    for t in out_tasks:
                        row = {"model": model, "n": n, "task": t, "method": meth, "status": "skipped"}
                        if prev is None:
                            row["reason"] = "time budget spent"
                        else:
                            n0, proj0 = prev
                            e = 2 if t == "similarity" else 1
                            row["projected_s"] = None if proj0 is None else proj0 * (n / n0) ** e
                            if proj0 is None:
                                row["reason"] = f"skipped at N={n0}"
                        res["results"].append(row)
                    continue
                cap_here = cap
                if model == "cnn1m" and task == "sim:layerwise" and n == 4096:
                    cap_here = max(cap, 15.0 * t_epoch)  # the goal's configuration: measure it if <= 15x epoch
                out = spawn(model, n, task, cap_=cap_here)
                if "error" in out:
                    for t in out_tasks:
                        res["results"].append({"model": model, "n": n, "task": t, "method": meth,
                                               "status": f"error: {out['error']}"})
                    print(f"  {task}: ERROR {out['error']}", flush=True)
                    if out["error"].startswith("timed out"):
                        skipped_at[(model, task)] = (n, None)
                    elif out["error"].startswith("PeerUnsupported"):
                        failed_at[(model, task)] = (n, out["error"])
                    continue
                for row in out["rows"]:
                    row.update(model=model, n=n)
                    if row["status"] == "ok":
                        row["x_epoch"] = row["seconds"] / t_epoch
                        row["epoch_s"] = t_epoch  # the epoch of this run: ratios survive a --merge
                    res["results"].append(row)
                    s, x, mb, st = row_cells(row)
                    print(f"  {row['task']:17s} {method_label(row):24s} {s:>8s} s {x:>7s}x "
                          f"{mb:>6s} MB  {st}", flush=True)
                if builds_g:
                    sim_rows = [r for r in out["rows"] if r["task"] == "similarity" and r["status"] == "skipped"]
                    if all(r["status"] == "skipped" for r in out["rows"]):
                        skipped_at[(model, task)] = (n, out["rows"][0].get("projected_s"))
                    elif sim_rows:
                        pass  # the next N re-probes
                elif out["rows"][0]["status"] == "skipped":
                    skipped_at[(model, task)] = (n, out["rows"][0].get("projected_s"))

    # ---------------------------------------------------------------- extras
    avail = [m for m in names if M.MODELS[m] is not None]
    if not args.no_extras:
        thread_n = min(4096 if not quick else 256, max(sizes))
        for model in [m for m in ("mlp", "mnist_cnn") if m in avail]:
            for task in ("epoch", "soft:layerwise"):
                for th in (1, 2):
                    if not spend_ok():
                        break
                    out = spawn(model, thread_n, task, threads=th, cap_=1e9)
                    if "error" in out:
                        res["threads"].append({"model": model, "n": thread_n, "task": task, "threads": th,
                                               "error": out["error"]})
                        continue
                    r = out["rows"][0]
                    res["threads"].append({"model": model, "n": thread_n, "task": TASK_NAMES.get(task[:4], "epoch")
                                           if task != "epoch" else "epoch", "threads": th,
                                           "cpu_s": r["seconds"], "wall_s": r["wall_s"], "reps": r["reps"],
                                           "loadavg": out["loadavg"]})
        summary = {}
        for model in {t["model"] for t in res["threads"]}:
            for task in ("epoch", "soft_density"):
                ts = {t["threads"]: t for t in res["threads"] if t["model"] == model and t["task"] == task and "wall_s" in t}
                if 1 in ts and 2 in ts:
                    faster = 1 if ts[1]["wall_s"] <= ts[2]["wall_s"] else 2
                    summary[f"{model}/{task}"] = {"wall_1": ts[1]["wall_s"], "wall_2": ts[2]["wall_s"],
                                                  "speedup_2_threads": ts[1]["wall_s"] / ts[2]["wall_s"],
                                                  "faster_threads": faster}
        res["threads_summary"] = summary

        res["soft_density_profile"] = {}
        prof_n = min(4096 if not quick else 1024, max(sizes))
        for model in [m for m in ("mnist_cnn", "cnn1m", "mlp") if m in avail]:
            if spend_ok():
                out = spawn(model, prof_n, "profile:soft", cap_=1e9)
                res["soft_density_profile"][model] = out

        mlp_sims = [r for r in res["results"] if r["model"] == "mlp" and r["task"] == "similarity"
                    and r["method"] == "layerwise" and r["status"] == "ok"]
        if mlp_sims and spend_ok():
            gl_n = min(4096, max(r["n"] for r in mlp_sims))
            res["gram_layers_mlp"] = spawn("mlp", gl_n, "gram_layers", cap_=1e9)
    mlp_sims = [r for r in res["results"] if r["model"] == "mlp" and r["task"] == "similarity"
                and r["method"] == "layerwise" and r["status"] == "ok" and r.get("gram_gflops")]
    if mlp_sims and "gflops" in res["gemm"]:
        r = max(mlp_sims, key=lambda r: r["n"])
        res["gemm_efficiency"] = {"model": "mlp", "n": r["n"], "gram_gflops": r["gram_gflops"],
                                  "mm_gflops": res["gemm"]["gflops"],
                                  "efficiency": r["gram_gflops"] / res["gemm"]["gflops"],
                                  "gram_share_of_similarity": r["gram_seconds"] / r["seconds"],
                                  "flop_formula": "per Linear(in, out) layer and pair of samples: 2 (in + d out) "
                                                  "(X X^T and Delta Delta^T GEMMs); dense layers 2 d p_l; summed "
                                                  "over the gram calls similarity executes (diagonal blocks in full)"}

    for r in res["results"]:  # which library code measured the row (merged files mix versions)
        r.setdefault("lib", res["library"]["lib_sha256"])
    if args.merge is not None and args.merge.is_file():
        res = merge_results(json.loads(args.merge.read_text()), res)
    res["goals"] = evaluate_goals(res)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    res["wall_time_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, args.out)

    print()
    print_table(res)
    if res["gemm"].get("gflops"):
        print(f"\ntorch.mm {GEMM_N}^2 (1 thread): {res['gemm']['gflops']:.1f} GFLOP/s")
    if res.get("gemm_efficiency"):
        e = res["gemm_efficiency"]
        print(f"layer-wise gram (MLP, N={e['n']}): {e['gram_gflops']:.1f} GFLOP/s = {e['efficiency']:.0%} of torch.mm; "
              f"gram is {e['gram_share_of_similarity']:.0%} of the similarity time")
    for k, v in res.get("threads_summary", {}).items():
        print(f"threads {k}: wall 1 thr {v['wall_1']:.3g} s, 2 thr {v['wall_2']:.3g} s -> {v['faster_threads']} faster")
    for model, prof in res.get("soft_density_profile", {}).items():
        if "parts" in prof:
            top = ", ".join(f"{k} {v / prof['total_s']:.0%}" for k, v in list(prof["parts"].items())[:4])
            print(f"soft_density profile {model} N={prof['n']} ({prof['total_s']:.3g} s): {top}")
    print("\ngoals:")
    for g in res["goals"]:
        m = g.get("measured")
        print(f"  [{'MET' if g['met'] else 'missed'}] {g['goal']}: measured "
              f"{'—' if m is None else f'{m:.3g}'} (target {g['target']}) {g.get('note', '')}")
    print(f"\nwrote {args.out} ({res['wall_time_s']:.0f} s wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
