"""How much a larger memory budget buys (issue #20): time and peak memory of the streaming functions
against `memory_budget`, on the bench models, to choose `netsim.memory.DEFAULT_MEMORY_BUDGET`.

    .venv/bin/python bench/memory_budget.py            # ~10 min, 1 thread, run alone
    .venv/bin/python bench/memory_budget.py --quick    # small N, 2 budgets (a smoke run)

Each measurement runs in a fresh forked process (the driver never runs a torch op): the function is
warmed up on a few samples, then timed once (CPU seconds, 1 thread); its peak memory is the
process's peak resident set above its resident set just before the call. The tasks are the ones
whose row blocks or kept first pass the budget sizes:

- `similarity` of the bench's transformer (layer-wise engine, small factors per sample);
- `similarity` of the registration U-Net (Jacobian engine, 2.5 MB of Jacobians per sample: every
  further row block is one more pass over the columns);
- `soft_density` of the 1.3M-parameter CNN (the first pass kept when it fits, else a forward-mode
  second pass);
- `neighbour_counts` (hard) of the sinusoid MLP (the kernel blocks dominate: a dense N x N would
  not fit a small budget).

Writes `bench/memory_budget_results.json`; `python -m netsim_paper.report update-readme` puts its
table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402  (no torch op in the driver: the measurements fork from it)

import models as M  # noqa: E402
from isolate import run_isolated  # noqa: E402

MIB = 2**20
BUDGETS = (64 * MIB, 256 * MIB, 1024 * MIB, 4096 * MIB)
TASKS = (("transformer", 2048, "similarity"), ("registration", 256, "similarity"), ("cnn1m", 1024, "soft_density"),
         ("mlp", 16384, "neighbour_counts"))
QUICK_TASKS = (("transformer", 256, "similarity"), ("mlp", 2048, "neighbour_counts"))


def measure(model: str, n: int, task: str, budget: int) -> dict:
    """One measurement in this (fresh) process."""
    import netsim
    from netsim_paper import runtime
    from timing import Clock, maxrss_mb, rss_mb

    runtime.configure_threads(1)
    torch.manual_seed(0)
    b = M.make_bench(model, n)
    options = dict(output_fn=b.output_fn, memory_budget=budget)

    def run(bench):
        if task == "similarity":
            return netsim.similarity(bench.model, bench.inputs, x_targets=bench.targets, **options)
        if task == "soft_density":
            return netsim.soft_density(bench.model, bench.inputs, targets=bench.targets, **options)
        return netsim.neighbour_counts(bench.model, bench.inputs, targets=bench.targets, tau=0.9, **options)

    run(b.subset(8))   # warm-up
    start = rss_mb()
    with Clock() as clock:
        out = run(b)
    return {"model": model, "n": n, "task": task, "budget_bytes": budget, "seconds": clock.cpu,
            "peak_extra_mb": max(0.0, maxrss_mb() - start), "result_mb": out.numel() * out.element_size() / MIB}


def child_measure(**spec) -> dict:   # run_isolated's entry point
    return measure(spec["model"], spec["n"], spec["task"], spec["budget"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "memory_budget_results.json")
    args = parser.parse_args()
    import isolate
    isolate.child_measure = child_measure
    rows = []
    for model, n, task in (QUICK_TASKS if args.quick else TASKS):
        for budget in (BUDGETS[::3] if args.quick else BUDGETS):
            row = run_isolated({"model": model, "n": n, "task": task, "budget": budget}, "fork", timeout=1800)
            rows.append(row if "error" not in row else {"model": model, "n": n, "task": task, "budget_bytes": budget,
                                                          **row})
            print(json.dumps(rows[-1]), flush=True)
    from netsim.memory import DEFAULT_MEMORY_BUDGET
    out = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or
           platform.machine(), "torch": torch.__version__, "threads": 1, "default_budget_bytes": DEFAULT_MEMORY_BUDGET,
           "timing": "process CPU seconds of one call after a warm-up on 8 samples; peak = ru_maxrss minus the "
                     "resident set just before the call", "rows": rows}
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
