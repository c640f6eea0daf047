"""netsim.memory: one budget -- the `memory_budget=` argument, else the environment variable
NETSIM_MEMORY_BUDGET, else the default -- bounds the peak memory of every function that streams, each
measured in a fresh process: the budget, plus the result it returns, plus one chunk's working set."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: The allocator's slack, in MiB: what a call's peak may exceed its budget and its result by, above
#: the peak of a warm-up on a few samples (which holds one chunk's working set). Measured: at most
#: 12 MiB over the cases below (2 runs each).
SLACK_MB = 24
BUDGET = 32 * 2**20

SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, torch, netsim
    case, budget = sys.argv[1], (None if sys.argv[2] == "default" else int(sys.argv[2]))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # ~100k parameters: a chunk's Jacobians are small, the kernel blocks and kept passes are not
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    options = {} if budget is None else {"memory_budget": budget}
    index_dir = tempfile.mkdtemp()
    calls = {
        "similarity": (3000, lambda x: netsim.similarity(model, x, **options)),
        "similarity jacobian": (3000, lambda x: netsim.similarity(model, x, method="jacobian", chunk_size=16,
                                                                  **options)),
        "neighbour_counts hard": (8000, lambda x: netsim.neighbour_counts(model, x, tau=0.5, **options)),
        "neighbour_counts positive": (8000, lambda x: netsim.neighbour_counts(model, x, estimator="positive",
                                                                              **options)),
        "soft_density": (8000, lambda x: netsim.soft_density(model, x, method="layerwise", **options)),
        "similarity_by_module": (1500, lambda x: netsim.similarity_by_module(model, x, **options)),
        "index query": (8000, lambda x: index.query(x[:3000], k=10)[1]),
    }
    n, call = calls[case]
    xs = torch.randn(n, 64)
    if case == "index query":
        index = netsim.SimilarityIndex.build(model, xs, index_dir, **options)
    def status_mb(key):
        for line in open('/proc/self/status'):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    # VmHWM, this address space's high-water mark (ru_maxrss would also count the pytest process this
    # child was forked from: rusage survives exec). The base is the peak of a warm-up on 200 samples:
    # it holds one chunk's working set already, whether the allocator kept that memory after it or not.
    call(xs[:200])
    base = status_mb('VmHWM')
    out = call(xs)
    parts = list(out.values()) if isinstance(out, dict) else [out]   # similarity_by_module: one (N, N) per module
    print(json.dumps(dict(n=n, base=base, peak=status_mb('VmHWM'),
                          result_mb=sum(t.numel() * t.element_size() for t in parts) / 2**20,
                          finite=all(bool(torch.isfinite(t.double()).all()) for t in parts))))
""")


def _measure(case: str, budget, env=None) -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT, case, str(budget)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "lib"),
                              **(env or {})})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


CASES = ["similarity", "similarity jacobian", "neighbour_counts hard", "neighbour_counts positive", "soft_density",
         "similarity_by_module", "index query"]


@pytest.mark.memory
@pytest.mark.parametrize("case", CASES)
def test_the_peak_memory_stays_within_the_budget_and_the_result(case):
    stats = _measure(case, BUDGET)
    assert stats["finite"]
    extra = stats["peak"] - stats["base"]
    assert extra < BUDGET / 2**20 + stats["result_mb"] + SLACK_MB, stats
    if case.startswith("neighbour_counts"):   # streamed counts: far below the dense matrix they never hold
        assert extra < stats["n"] ** 2 * 4 / 2**20 / 4, stats


@pytest.mark.memory
def test_the_environment_variable_is_the_default_budget():
    stats = _measure("neighbour_counts hard", "default", env={"NETSIM_MEMORY_BUDGET": "32MiB"})
    assert stats["peak"] - stats["base"] < 32 + stats["result_mb"] + SLACK_MB, stats


@pytest.mark.memory
def test_streamed_counts_never_hold_more_than_the_matrix_they_avoid():
    """With the default budget (1 GiB) and 8000 samples, the hard counts stay below the 244 MiB of
    the dense k^C matrix (they held twice it before the cap)."""
    stats = _measure("neighbour_counts hard", "default", env={"NETSIM_MEMORY_BUDGET": ""})   # empty: the default
    dense_mb = stats["n"] ** 2 * 4 / 2**20
    assert stats["peak"] - stats["base"] < dense_mb + SLACK_MB, stats
