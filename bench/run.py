"""netsim benchmark: per-sample gradients, soft density and similarity vs a training epoch.

    python bench/run.py [--quick] [--only mlp,cnn1m] [--sizes 256,1024] [--out PATH]
    python bench/run.py --one MODEL N TASK        # one measurement, JSON on stdout

What is measured (see bench/README.md for the full protocol):

- epoch: forward + backward of the plain training loss in batches of 128 over the same N
  samples (`bench.models.epoch`; no optimizer step: Adam is NOT included).
- per_sample_grads / soft_density / similarity (k^C, trace, N x N) with netsim's two engines
  (method="layerwise", method="jacobian"; soft_density and similarity also with method="auto",
  the faster one as measured by the library) and two baselines run in the same session: the naive
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

Modules: `tasks` (one measurement: ours, the epoch, dispatch), `baselines` (the methods that
materialise G, the peers' kernels, their checks against netsim), `flops` (the similarity's
plan and GEMM flops), `timing`, `extras` (torch.mm, memory, per-layer gram, profile),
`isolate` (fresh processes), `sweep` (the driver's loop), `records` (results.json: merge,
goals, console table), `models` and `peers`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


import models as M  # noqa: E402
import peers as P  # noqa: E402  (imports no peer library: they load in the children that use them)
from baselines import DENSE_EFF  # noqa: E402
from extras import GEMM_N  # noqa: E402
from netsim.memory import budget_bytes  # noqa: E402
from records import evaluate_goals, library_state, machine_info, merge_results, print_table  # noqa: E402
from sweep import Sweep, gemm_efficiency  # noqa: E402
from tasks import GRAM_EFF, TASKS, child_measure  # noqa: E402

FULL_SIZES = (1024, 4096, 16384)
QUICK_SIZES = (256, 1024)


def parser() -> argparse.ArgumentParser:
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
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
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
    res = {"mode": "quick" if quick else "full", "date": datetime.now(UTC).isoformat(timespec="seconds"),
           "machine": machine_info(), "library": library_state(),
           "settings": {"sizes": list(sizes), "reps": reps, "rep_budget_s": rep_budget, "cap_s": cap,
                        "g_limit_gb": args.g_limit_gb, "threads": 1, "isolate": args.isolate,
                        "timing": "process CPU time (time.process_time), median of reps, torch.set_num_threads(1)",
                        "epoch": "forward + backward of the plain loss, batch 128 over the N samples; "
                                 "optimizer (Adam) step NOT included",
                        "peak_extra_mb": "ru_maxrss at the end minus RSS after setup (model, data, warm-up)",
                        "memory_budget_bytes": budget_bytes(),
                        "projection": "timed 64-sample probe; similarity: engine block plan + gram flops at "
                                      f"{GRAM_EFF:.0%} of torch.mm ({DENSE_EFF:.0%} for dense G G^T)"},
           "models": {}, "results": [], "threads": [], "peers": {}, "timeline": []}

    reserve = 0.0 if args.no_extras else (40.0 if quick else 240.0)  # wall s kept for the extras
    sweep = Sweep(res, t_start=t_start, budget=budget, cap=cap, reps=reps, rep_budget=rep_budget,
                  isolate=args.isolate, g_limit_gb=args.g_limit_gb, reserve=reserve)

    print(f"netsim bench ({res['mode']}): sizes {sizes}, cap {cap:.0f} s, reps {reps}, models {names}", flush=True)
    res["peers"] = P.status()
    if absent:
        print(f"peers not installed, not timed: {', '.join(t.partition(':')[2] for t in absent)} ({P.INSTALL_HINT})",
              flush=True)
    res["memory"] = sweep.spawn(None, args.prefault_gb, "memory", cap=1e9)
    m = res["memory"]
    if "fault_s_per_gib" in m:
        print(f"memory: prefault {m.get('prefault_gib')} GiB in {m.get('prefault_s', 0):.1f} s; fresh pages "
              f"{m['fault_s_per_gib']:.2f} s/GiB, rewrite {m['write_s_per_gib']:.2f} s/GiB (CPU)", flush=True)
    gemm = sweep.spawn(None, 0, "gemm")
    res["gemm"] = gemm
    if "gflops" in gemm:
        print(f"torch.mm {GEMM_N}^2, 1 thread: {gemm['gflops']:.1f} GFLOP/s", flush=True)

    sweep.models(names, sizes, tasks)
    if not args.no_extras:
        sweep.extras(names, sizes, quick)
    efficiency = gemm_efficiency(res)
    if efficiency is not None:
        res["gemm_efficiency"] = efficiency

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

    print_summary(res, args.out)
    return 0


def print_summary(res: dict, out: Path) -> None:
    """The console table, the GEMM rates, threads, soft-density profiles and goals of a run."""
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
            base = prof.get("profiled_s") or prof["total_s"]  # files of earlier runs lack profiled_s
            top = ", ".join(f"{k} {v / base:.0%}" for k, v in list(prof["parts"].items())[:4])
            print(f"soft_density profile {model} N={prof['n']} ({prof['total_s']:.3g} s, profiled "
                  f"{base:.3g} s): {top}")
    print("\ngoals:")
    for g in res["goals"]:
        m = g.get("measured")
        print(f"  [{'MET' if g['met'] else 'missed'}] {g['goal']}: measured "
              f"{'—' if m is None else f'{m:.3g}'} (target {g['target']}) {g.get('note', '')}")
    print(f"\nwrote {out} ({res['wall_time_s']:.0f} s wall)")


if __name__ == "__main__":
    sys.exit(main())
