"""Measures the repository's run-time budgets and records them in bench/results.json.

    python bench/budgets.py [--skip-tests]

Times `./run_all.sh --profile smoke` and `./run_tests.sh` (wall clock, as a user sees them)
and collects the paper-profile compute times each notebook recorded in `figures/*.json` when
its cached results were built (re-running the paper profile from scratch takes ~30 min, so it
is not repeated here). Budgets (issue "Performance"): run_all paper <= 60 min, smoke <= 8 min,
run_tests <= 15 min.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS_S = {"run_all_paper": 3600, "run_all_smoke": 480, "run_tests": 900}
# compute-time keys each notebook records (seconds), summed as its from-scratch paper time
PAPER_KEYS = {"00_kernel_tour": ["wall_seconds"], "02_sinusoid_density": ["train_seconds", "analysis_seconds"],
              "03_mnist_speedup": ["compute_seconds"]}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def paper_seconds() -> dict[str, float]:
    out = {}
    for stem, keys in PAPER_KEYS.items():
        path = ROOT / "figures" / f"{stem}.json"
        if path.exists():
            data = json.loads(path.read_text())
            out[stem] = float(sum(data[k] for k in keys))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true", help="do not time ./run_tests.sh")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    args = parser.parse_args()
    measured = {"run_all_smoke": timed(["./run_all.sh", "--profile", "smoke"])}
    if not args.skip_tests:
        measured["run_tests"] = timed(["./run_tests.sh"])
    per_notebook = paper_seconds()
    measured["run_all_paper"] = sum(per_notebook.values())
    budgets = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "note": ("smoke and tests: wall clock of the commands with .venv built and data/cache filled "
                 "(a fresh clone adds ~1.5 min of set-up and the smoke trainings, see README); paper: "
                 "the sum of the compute times the notebooks recorded when their cached results were built"),
        "paper_per_notebook_s": per_notebook,
        "rows": [{"what": k, "seconds": round(v, 1), "budget_s": BUDGETS_S[k], "met": v <= BUDGETS_S[k]}
                 for k, v in measured.items()],
    }
    path = Path(args.results)
    results = json.loads(path.read_text())
    results["budgets"] = budgets
    path.write_text(json.dumps(results, indent=2) + "\n")
    for row in budgets["rows"]:
        met = "met" if row["met"] else "MISSED"
        print(f"{row['what']:>14}: {row['seconds']:8.1f} s (budget {row['budget_s']} s) {met}")


if __name__ == "__main__":
    main()
