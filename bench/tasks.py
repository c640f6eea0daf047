"""One measurement, in a fresh process: `child_measure(model, n, task)`.

A task is "epoch" (the reference), one of our engines ("grads:", "soft:", "sim:" followed by
"layerwise" or "jacobian"; "soft:auto", "sim:auto": the engine `method="auto"` picks by timing
both, its row names the pick), a baseline that builds G ("naive", "vmap"), a peer ("peer:<name>",
`bench/peers.py`), or one of the one-off measurements of `extras` ("gemm", "memory",
"gram_layers", "profile:soft"). Every timed task is warmed up on a few samples (untimed), then
projected from a timed probe: a projection over the cap skips it instead of running it.
"""

from __future__ import annotations

import gc
import os

import torch

import baselines
import extras
import models as M
import peers as P
from flops import GramMeter, bench_engine, similarity_plan
from timing import WARMUP, maxrss_mb, probe_seconds, repeat, result_row, rss_mb

TASKS = ("epoch", "grads:jacobian", "grads:layerwise", "grads:auto", "soft:layerwise", "soft:jacobian", "soft:auto",
         "sim:layerwise", "sim:jacobian", "sim:auto", "naive", "vmap", *(f"peer:{m}" for m in P.PEERS))
TASK_NAMES = baselines.DENSE_TASKS
PROBE = 64            # samples of the timed probe used for projections
GRAM_EFF = 0.5        # assumed gram efficiency vs torch.mm in the similarity projections


def child_measure(model: str, n: int, task: str, *, cap: float, reps: int, rep_budget: float,
                  threads: int = 1, mm_gflops: float = 30.0) -> dict:
    """One measurement in this (fresh) process. Returns {"rows": [...], ...}."""
    from netsim_paper import runtime
    runtime.configure_threads(threads)
    torch.manual_seed(0)
    if task == "gemm":
        return extras.gemm(reps)
    if task == "memory":
        return extras.memory(n)
    b = M.make_bench(model, n)
    if task == "gram_layers":
        return extras.gram_layers(b, reps)
    if task == "profile:soft":
        return extras.profile_soft(b)
    # warm torch up: a matmul, then the method itself on a few samples (untimed)
    torch.ones(64, 64) @ torch.ones(64, 64)
    run, project, rows_from = task_functions(task, b, mm_gflops)
    run(b.subset(min(n, WARMUP)))
    gc.collect()
    rss0 = rss_mb()
    projected = None
    if task != "epoch" and n > PROBE:
        projected = project(b.subset(PROBE), n)
    result = rows_from(run, projected, cap, reps, rep_budget, rss0)
    from netsim.grads import num_parameters
    return {"rows": result, "rss_setup_mb": rss0, "threads": threads, "loadavg": os.getloadavg(),
            "params": num_parameters(b.model), "d": b.d}


def task_functions(task: str, b, mm_gflops: float):
    """(run(bench), project(probe_bench, n) -> seconds or dict, rows_from(...)) for a task."""
    kind, _, method = task.partition(":")
    rate = mm_gflops * 1e9
    if task == "epoch":
        def rows_from(run, projected, cap, reps, rep_budget, rss0):
            cpu, wall = repeat(lambda: run(b), reps, rep_budget)
            return [result_row("epoch", "epoch", cpu, wall, peak_extra_mb=max(0.0, maxrss_mb() - rss0))]
        return M.epoch, None, rows_from
    if kind in ("grads", "soft", "sim"):
        return ours_task(b, kind, method, rate)
    if task in ("naive", "vmap"):
        return baselines.dense_task(b, M.naive_grads if task == "naive" else M.vmap_grads, task, {}, rate)
    if kind == "peer":
        prepared = P.prepare(method, b)
        info = {k: v for k, v in (("variant", prepared.variant), ("as_given_error", prepared.as_given_error),
                                  ("captum_mode", prepared.mode)) if v is not None}
        if prepared.kind == "gram":
            return baselines.gram_peer_task(b, prepared, info, rate)
        return baselines.dense_task(b, P.quiet(prepared.run), method, info, rate)
    raise ValueError(f"unknown task {task!r}")


def ours_task(b, kind: str, method: str, rate: float):
    """One of our engines (`method`) on G ("grads"), the soft density ("soft") or the N x N
    similarity ("sim"), whose gram calls are also metered (seconds, executed flops)."""
    fn = {"grads": lambda bb: M.ours_grads(bb, method),
          "soft": lambda bb: M.ours_soft_density(bb, method),
          "sim": lambda bb: M.ours_similarity(bb, method)}[kind]
    meter = GramMeter() if kind == "sim" else None

    def project(probe, n):
        t = probe_seconds(fn, probe)
        if kind != "sim":
            return t * n / probe.n
        plan = similarity_plan(b, method)
        ev_p, _ = plan["counts"](probe.n)
        ev, _ = plan["counts"](n)
        return t / ev_p * ev + plan["flops"](n) / (GRAM_EFF * rate)

    def rows_from(run, projected, cap, reps, rep_budget, rss0):
        extra = {"projected_s": projected}
        if kind == "sim":
            plan = similarity_plan(b, method)
            evals, pairs = plan["counts"](b.n)
            extra.update(rows_per_block=plan["rows_per_block"], jacobian_evals=evals, gram_pairs=pairs)
        if projected is not None and projected > cap:
            return [result_row(TASK_NAMES[kind], method, status="skipped", **extra)]
        if meter:
            meter.reset()
        cpu, wall = repeat(lambda: fn(b), reps, rep_budget)
        extra["peak_extra_mb"] = max(0.0, maxrss_mb() - rss0)
        if method == "auto":  # the choice made in the warm-up, cached per model structure
            extra["variant"] = f"picked {bench_engine(b, 'auto').name}"
        if meter and meter.calls:
            extra.update(gram_seconds=meter.seconds / len(cpu), gram_flops=meter.flops / len(cpu))
            extra["gram_gflops"] = extra["gram_flops"] / max(extra["gram_seconds"], 1e-9) / 1e9
        return [result_row(TASK_NAMES[kind], method, cpu, wall, **extra)]
    return fn, project, rows_from
