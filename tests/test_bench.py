"""The benchmark suite (bench/): every fast path it times gives the naive reference's numbers,
the runner writes a valid results.json, and the README performance section is generated.

Nothing here is timed: the numbers of bench/run.py are checked for consistency, not speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netsim import report

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


run = _load("netsim_bench_run", BENCH / "run.py")   # puts bench/ on sys.path, imports bench/models.py
M = run.M

N_TINY = 12


def _reference(b):
    """G by one autograd.grad per sample (independent of the bench code), then k^C and N_S."""
    params = [p for p in b.model.parameters() if p.requires_grad]
    rows = []
    for i in range(b.n):
        out = b.outputs(b.inputs[i:i + 1], None if b.targets is None else b.targets[i:i + 1])
        assert out.shape == (1, 1)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[0, 0], params)]))
    G = torch.stack(rows).double()
    Q = G / G.norm(dim=1, keepdim=True)
    K = Q @ Q.T
    return G, K, K.sum(1)


@pytest.fixture(scope="module", params=M.available_models())
def case(request):
    b = M.make_bench(request.param, N_TINY, seed=3)
    return b, _reference(b)


def _close(actual, expected, atol):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=atol)


def test_registration_listed_as_not_available():
    assert "registration" in M.MODELS and "registration" not in M.available_models()
    with pytest.raises(NotImplementedError, match="not yet available"):
        M.make_bench("registration", 4)


def test_model_sizes():
    sizes = {name: sum(p.numel() for p in M.make_bench(name, 2).model.parameters()) for name in M.available_models()}
    assert sizes == {"mlp": 21_057, "mnist_cnn": 317_069, "cnn1m": 1_295_050}


def test_per_sample_grads_paths_match_reference(case):
    b, (G, _, _) = case
    scale = G.abs().max().item()
    for fn in (M.naive_grads, M.vmap_grads, M.layerwise_grads, M.ours_grads):
        _close(fn(b), G, 1e-5 * scale)


@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
def test_ours_match_reference(case, method):
    b, (_, K, ns) = case
    _close(M.ours_soft_density(b, method), ns, 1e-4 * N_TINY)
    _close(M.ours_similarity(b, method), K, 1e-4)


@pytest.mark.parametrize("build", ["naive_grads", "vmap_grads"])
def test_baselines_match_reference(case, build):
    b, (_, K, ns) = case
    _close(M.dense_soft_density(getattr(M, build)(b)), ns, 1e-4 * N_TINY)
    _close(M.dense_similarity(getattr(M, build)(b)), K, 1e-4)


def test_epoch_leaves_no_gradients():
    b = M.make_bench("mlp", 300)
    M.epoch(b)  # 3 batches of <= 128
    assert all(p.grad is None for p in b.model.parameters())


@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
def test_similarity_plan_counts_the_executed_gram_flops(method):
    """The flop formula of the GEMM-efficiency goal equals what the gram calls execute."""
    b = M.make_bench("mlp", 300)
    plan = run.similarity_plan(b, method)
    meter = run.GramMeter()
    try:
        M.ours_similarity(b, method)
    finally:  # undo the wrapping for the other tests
        meter.restore()
    evals, pairs = plan["counts"](300)
    assert meter.flops == pairs * plan["pair_flops"]
    assert pairs == 300 * 300  # one row block: the whole square
    # MLP Linear(2,64), 5 x Linear(64,64), Linear(64,1); d = 1: 2 (in + out) per layer and pair
    assert plan["pair_flops"] == (2 * (2 + 64) + 5 * 2 * (64 + 64) + 2 * (64 + 1)) if method == "layerwise" \
        else plan["pair_flops"] == 2 * 21_057


@pytest.mark.slow
def test_run_quick_smoke(tmp_path):
    """The runner end to end on the MLP with N = 64 (~15 s: every measurement forks a process)."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--only", "mlp,registration",
                           "--sizes", "64", "--reps", "1", "--prefault-gb", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and res["settings"]["sizes"] == [64]
    assert {"cpu_model", "cores", "torch"} <= set(res["machine"])
    assert res["models"]["registration"]["available"] is False
    rows = {(r["task"], r["method"]): r for r in res["results"] if r["model"] == "mlp"}
    for task in ("per_sample_grads", "soft_density", "similarity"):
        for method in ("layerwise", "jacobian", "naive", "vmap"):
            r = rows[(task, method)]
            assert r["status"] == "ok" and r["seconds"] > 0 and r["x_epoch"] > 0 and r["peak_extra_mb"] >= 0
    assert rows[("epoch", "epoch")]["x_epoch"] == 1.0
    assert res["gemm"]["gflops"] > 0 and res["memory"]["fault_s_per_gib"] > 0
    assert res["library"]["lib_sha256"] and res["soft_density_profile"]["mlp"]["total_s"] > 0
    goals = {g["goal"]: g for g in res["goals"]}
    assert all(isinstance(g["met"], bool) and g["target"] > 0 for g in goals.values())
    assert any("mlp" in k for k in goals) and any("GEMM" in k for k in goals)
    assert {t["threads"] for t in res["threads"]} == {1, 2}
    assert "not yet available" in proc.stdout and "goals:" in proc.stdout
    md = report.performance_markdown(out)
    assert "| mlp | 64 | soft_density | ours: layerwise |" in md and "| Goal |" in md


RESULTS = {
    "mode": "quick", "date": "2025-01-01T00:00:00+00:00",
    "machine": {"cpu_model": "Test CPU", "cores": 2, "torch": "2.13.0"},
    "settings": {"timing": "process CPU time", "epoch": "forward + backward, no Adam"},
    "results": [
        {"model": "mlp", "n": 256, "task": "epoch", "method": "epoch", "status": "ok", "seconds": 0.5,
         "x_epoch": 1.0, "peak_extra_mb": 1.0},
        {"model": "mlp", "n": 256, "task": "soft_density", "method": "layerwise", "status": "ok",
         "seconds": 1.25, "x_epoch": 2.5, "peak_extra_mb": 12.4},
        {"model": "cnn1m", "n": 4096, "task": "per_sample_grads", "method": "naive", "status": "infeasible",
         "needs_gb": 21.2},
        {"model": "cnn1m", "n": 4096, "task": "similarity", "method": "jacobian", "status": "skipped",
         "projected_s": 999.4},
        {"model": "registration", "n": None, "task": "—", "method": "—", "status": "not yet available"},
    ],
    "gemm": {"n": 2048, "gflops": 100.0},
    "gemm_efficiency": {"n": 256, "gram_gflops": 70.0, "efficiency": 0.7},
    "threads_summary": {"mlp/epoch": {"wall_1": 1.0, "wall_2": 2.0, "faster_threads": 1}},
    "goals": [{"goal": "soft_density <= 3x epoch (mlp)", "target": 3.0, "measured": 2.5, "met": True},
              {"goal": "similarity at N=4096 <= 10x epoch", "target": 10.0, "measured": None, "met": False,
               "note": "not measured"}],
}


def test_performance_markdown(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    md = report.performance_markdown(path)
    assert "| Model | N | Task | Method | Seconds | × epoch | Peak extra MB |" in md
    assert "| mlp | 256 | soft_density | ours: layerwise | 1.25 | 2.5 | 12 |" in md
    assert "| cnn1m | 4096 | per_sample_grads | naive loop | infeasible (G needs 21.2 GB) | — | — |" in md
    assert "skipped (projected 999 s)" in md and "not yet available" in md
    assert "100.0 GFLOP/s" in md and "70%" in md
    assert "| soft_density <= 3x epoch (mlp) | 2.5 | 3 | yes |" in md
    assert "| similarity at N=4096 <= 10x epoch — not measured | — | 10 | no |" in md
    assert "Test CPU" in md and "quick" in md and "Note:" not in md
    path.write_text(json.dumps(dict(RESULTS, note="rows | merged")))
    assert "Note: rows \\| merged" in report.performance_markdown(path)
    budgets = {"note": "measured", "date": "d", "rows": [
        {"what": "run_tests", "seconds": 201.4, "budget_s": 900, "met": True},
        {"what": "run_all_paper", "seconds": 4000.0, "budget_s": 3600, "met": False}]}
    path.write_text(json.dumps(dict(RESULTS, budgets=budgets)))
    md = report.performance_markdown(path)
    assert "| run_tests | 201 | 900 | yes |" in md and "| run_all_paper | 4000 | 3600 | no |" in md


README = f"""# netsim

{report.START}
old results
{report.END}

## Performance

{report.PERF_START}
old performance
{report.PERF_END}

## Data
"""


def test_update_readme_fills_performance_markers(tmp_path):
    bench = tmp_path / "results.json"
    bench.write_text(json.dumps(RESULTS))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report.update_readme(readme, tmp_path / "figures", bench)
    text = readme.read_text()
    assert "old results" not in text and "old performance" not in text
    assert f"{report.PERF_START}\n{report.performance_markdown(bench)}{report.PERF_END}" in text
    assert text.endswith("## Data\n") and "No results yet" in text
    report.update_readme(readme, tmp_path / "figures", bench)  # idempotent
    assert readme.read_text() == text


def test_update_readme_leaves_performance_alone_without_results_or_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report.update_readme(readme, tmp_path / "figures", tmp_path / "missing.json")
    assert "old performance" in readme.read_text()
    bench = tmp_path / "results.json"
    bench.write_text(json.dumps(RESULTS))
    only_start = README.replace(report.PERF_END, "")
    readme.write_text(only_start)
    report.update_readme(readme, tmp_path / "figures", bench)
    assert "old performance" in readme.read_text()


@pytest.mark.parametrize("task", ["naive", "vmap"])
def test_baseline_child_skips_only_the_similarity_when_its_projection_exceeds_the_cap(task):
    """A tiny torch.mm rate makes the projected G G^T huge: G and the soft density still run, twice."""
    out = run.child_measure("mlp", 128, task, cap=30.0, reps=2, rep_budget=100.0, mm_gflops=1e-6)
    rows = {r["task"]: r for r in out["rows"]}
    assert rows["similarity"]["status"] == "skipped" and rows["similarity"]["projected_s"] > 30
    assert rows["per_sample_grads"]["status"] == rows["soft_density"]["status"] == "ok"
    assert rows["soft_density"]["reps"] >= 2 and rows["soft_density"]["seconds"] >= rows["per_sample_grads"]["seconds"]


def test_merge_results_keeps_old_rows_and_lets_new_ones_win():
    row = lambda model, n, task, method, s: {"model": model, "n": n, "task": task, "method": method,  # noqa: E731
                                             "status": "ok", "seconds": s}
    old = {"mode": "full", "date": "d0", "models": {"mlp": {"available": True}},
           "results": [row("mlp", 64, "epoch", "epoch", 1.0), row("mlp", 64, "similarity", "layerwise", 5.0)],
           "threads": [{"x": 1}], "soft_density_profile": {"mlp": {"total_s": 1}}, "timeline": [{"t": 0}]}
    new = {"mode": "full", "date": "d1", "models": {"cnn1m": {"available": True}},
           "results": [row("mlp", 64, "similarity", "layerwise", 4.0), row("cnn1m", 64, "epoch", "epoch", 2.0)],
           "threads": [], "soft_density_profile": {}, "timeline": [{"t": 1}]}
    out = run.merge_results(old, new)
    assert [(r["model"], r["task"], r["seconds"]) for r in out["results"]] == [
        ("mlp", "epoch", 1.0), ("mlp", "similarity", 4.0), ("cnn1m", "epoch", 2.0)]
    assert set(out["models"]) == {"mlp", "cnn1m"} and out["threads"] == [{"x": 1}]
    assert out["soft_density_profile"] == {"mlp": {"total_s": 1}} and len(out["timeline"]) == 2
    assert out["date"] == "d1" and out["merged"][0]["date"] == "d0"
