"""The benchmark suite (bench/): every fast path it times gives the naive reference's numbers,
the runner writes a valid results.json, and the README performance section is generated.

Nothing here is timed: the numbers of bench/run.py are checked for consistency, not speed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from netsim_paper import report

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


sys.path.insert(0, str(BENCH))  # the bench's modules import each other by name, as bench/run.py does

import flops  # noqa: E402
import models as M  # noqa: E402
import peers as P  # noqa: E402
import records  # noqa: E402
import tasks  # noqa: E402


def test_cli_parses_its_options():
    spec = importlib.util.spec_from_file_location("netsim_bench_run", BENCH / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    args = run.parser().parse_args(["--quick", "--only", "mlp", "--tasks", "soft:layerwise"])
    assert args.quick and args.only == "mlp" and args.tasks == "soft:layerwise" and args.isolate == "fork"


N_TINY = 12


def _reference(b):
    """G `(N, d, p)` by one autograd.grad per sample and output (independent of the bench
    code), then k^C (trace: Tr(K_xx^-1/2 K_xy K_yy^-1/2) / d, full rank here) and N_S."""
    params = [p for p in b.model.parameters() if p.requires_grad]
    rows = []
    for i in range(b.n):
        out = b.outputs(b.inputs[i:i + 1], None if b.targets is None else b.targets[i:i + 1])
        assert out.shape == (1, b.d)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[0, a], params,
                                                                                         retain_graph=True)])
                                 for a in range(b.d)]))
    G = torch.stack(rows).double()
    gram = torch.einsum("xap,ybp->xyab", G, G)
    evals, evecs = torch.linalg.eigh(gram[torch.arange(b.n), torch.arange(b.n)])
    root = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(1, 2)     # K(x, x)^-1/2
    K = torch.einsum("xab,xybc,ycd->xyad", root, gram, root).diagonal(dim1=2, dim2=3).sum(-1) / b.d
    return G, K, K.sum(1)


#: Patch side for the registration net in the numerical tests (the bench uses 64; the net takes
#: any multiple of 4, and 16 x 16 keeps these tests fast on a loaded machine).
SMALL_PATCH = 16


@pytest.fixture(scope="module", params=M.available_models())
def case(request):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(M, "REGISTRATION_PATCH", SMALL_PATCH)
        b = M.make_bench(request.param, N_TINY, seed=3)
    return b, _reference(b)


def _close(actual, expected, atol):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=atol)


def test_registration_bench_is_the_analysed_stage_on_packed_pairs():
    """The registration model timed is the one the notebooks analyse: the paper profile's coarse
    stage (its channels, GroupNorm, its cap)."""
    from netsim_paper.registration.config import RegistrationConfig
    from netsim_paper.registration.model import RegistrationNet
    cfg = RegistrationConfig.PAPER
    b = M.make_bench("registration", 3)
    net = b.model.net
    assert isinstance(net, RegistrationNet) and net.cap == cfg.caps[0] == 8.0 and net.channels == cfg.channels
    assert cfg.norm == "group" and sum(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) == 18
    assert b.inputs.shape == (3, 6, 64, 64) and b.d == 2
    # the packed wrapper is the two-input net on the (image, raster) halves
    torch.testing.assert_close(b.model(b.inputs), net(b.inputs[:, :3], b.inputs[:, 3:]))
    assert b.outputs(b.inputs, None).shape == (3, 2)
    assert b.loss(b.model(b.inputs), b.loss_targets).ndim == 0


def test_registration_runs_on_the_layerwise_engine(monkeypatch):
    """The layer-wise engine takes the registration net as it is (ReLU(inplace=True) included):
    one factor per parameterised module, 19 Conv2d and 18 GroupNorm (exactness: the tests
    against the reference below)."""
    from netsim import layerwise
    monkeypatch.setattr(M, "REGISTRATION_PATCH", SMALL_PATCH)
    b = M.make_bench("registration", 2)
    factors = layerwise.factorise(b.model, b.inputs, b.output_fn)
    kinds = [type(m) for m in b.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.GroupNorm))]
    assert len(factors) == len(kinds) == 37 and kinds.count(torch.nn.Conv2d) == 19
    # every layer has a layer-wise rule (an unsupported module would raise UnsupportedModel);
    # which engine `auto` keeps is measured, so not asserted here
    assert flops.bench_engine(b, "layerwise").name == "layerwise"


def test_model_sizes():
    sizes = {name: sum(p.numel() for p in M.make_bench(name, 2).model.parameters()) for name in M.available_models()}
    hf = {"hf_bert": 139_716, "hf_gpt2": 135_424, "hf_llama": 138_304} if M._has_transformers() else {}
    assert sizes == {"mlp": 21_057, "mnist_cnn": 317_069, "cnn1m": 1_295_050, "registration": 313_954,
                     "transformer": 131_204, "resnet": 78_042, **hf}


def test_transformer_bench_is_a_two_layer_text_classifier_in_eval_mode():
    b = M.make_bench("transformer", 3)
    layers = [m for m in b.model.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    assert len(layers) == 2 and all(m.self_attn.batch_first for m in layers) and not b.model.training
    assert b.inputs.shape == (3, M.TEXT_LENGTH) and b.inputs.dtype == torch.long
    assert b.outputs(b.inputs, b.targets).shape == (3, 1)


def test_resnet_bench_has_calibrated_batchnorm_and_a_training_mode_epoch():
    """The kernels see the eval-mode ResNet (running statistics from the calibration pass, not
    the initial 0 / 1); its epoch runs in training mode and leaves mode and statistics as they were."""
    b = M.make_bench("resnet", 130)
    norms = [m for m in b.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 9 and not b.model.training and b.train_epoch
    assert all(m.running_var.sub(1).abs().max() > 1e-2 for m in norms)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    seen = []
    hook = norms[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    M.epoch(b)  # 2 batches
    hook.remove()
    assert seen == [True, True] and not b.model.training
    for k, v in b.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in b.model.parameters())


def test_per_sample_grads_paths_match_reference(case):
    b, (G, _, _) = case
    scale = G.abs().max().item()
    # plain vmap cannot run transformers' mask helpers (data-dependent control flow): not a path there
    plain_vmap = [] if b.name.startswith("hf_") else [M.vmap_grads]
    for fn in (M.naive_grads, *plain_vmap, lambda b: M.ours_grads(b, "layerwise"), M.ours_grads):
        _close(fn(b), G, 1e-5 * scale)


@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
def test_ours_match_reference(case, method):
    b, (_, K, ns) = case
    _close(M.ours_soft_density(b, method), ns, 1e-4 * N_TINY)
    _close(M.ours_similarity(b, method), K, 1e-4)


@pytest.mark.parametrize("build", ["naive_grads", "vmap_grads"])
def test_baselines_match_reference(case, build):
    b, (_, K, ns) = case
    if build == "vmap_grads" and b.name.startswith("hf_"):
        pytest.skip("plain vmap cannot run transformers' mask helpers (data-dependent control flow)")
    _close(M.dense_soft_density(getattr(M, build)(b)), ns, 1e-4 * N_TINY)
    _close(M.dense_similarity(getattr(M, build)(b)), K, 1e-4)


def test_epoch_leaves_no_gradients():
    b = M.make_bench("mlp", 300)
    M.epoch(b)  # 3 batches of <= 128
    assert all(p.grad is None for p in b.model.parameters())


def test_dense_steps_for_d_2_match_the_reference():
    torch.manual_seed(0)
    G = torch.randn(5, 2, 7)
    G64 = G.double()
    gram = torch.einsum("xap,ybp->xyab", G64, G64)
    evals, evecs = torch.linalg.eigh(gram[torch.arange(5), torch.arange(5)])
    root = evecs @ torch.diag_embed(evals.rsqrt()) @ evecs.transpose(1, 2)
    K = torch.einsum("xab,xybc,ycd->xyad", root, gram, root).diagonal(dim1=2, dim2=3).sum(-1) / 2
    _close(M.correlation_from_gram(gram.float()), K, 1e-5)
    _close(M.dense_similarity(G.clone()), K, 1e-5)
    _close(M.dense_soft_density(G.clone()), K.sum(1), 1e-5)
    # any strides: a (d, N, p) layout seen as (N, d, p), as nngeometry returns it
    _close(M.dense_similarity(G.permute(1, 0, 2).contiguous().permute(1, 0, 2)), K, 1e-5)


@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
def test_similarity_plan_counts_the_executed_gram_flops(method):
    """The flop formula of the GEMM-efficiency goal equals what the gram calls execute."""
    b = M.make_bench("mlp", 300)
    plan = flops.similarity_plan(b, method)
    meter = flops.GramMeter()
    try:
        M.ours_similarity(b, method)
    finally:  # undo the wrapping for the other tests
        meter.restore()
    evals, pairs = plan["counts"](300)
    assert meter.flops == plan["flops"](300) <= pairs * plan["pair_flops"]
    assert pairs == 300 * 300  # one row block: the whole square
    # MLP Linear(2,64), 5 x Linear(64,64), Linear(64,1); d = 1: 2 (in + out) per layer and pair
    assert plan["pair_flops"] == (2 * (2 + 64) + 5 * 2 * (64 + 64) + 2 * (64 + 1)) if method == "layerwise" \
        else plan["pair_flops"] == 2 * 21_057


def test_similarity_plan_counts_the_executed_gram_flops_for_d_2(monkeypatch):
    monkeypatch.setattr(M, "REGISTRATION_PATCH", SMALL_PATCH)
    b = M.make_bench("registration", 6)
    plan = flops.similarity_plan(b, "layerwise")
    meter = flops.GramMeter()
    try:
        M.ours_similarity(b, "layerwise")
    finally:
        meter.restore()
    assert meter.flops == plan["flops"](6) == plan["counts"](6)[1] * plan["pair_flops"]   # 6 rows: one tile
    assert plan["pair_flops"] == 2 * 2 * 313_954   # conv and GroupNorm layers are dense: 2 d p_l per pair


# --------------------------------------------------------------------------- peers
# Skipped where the optional `bench` extra is not installed (CI, the default .venv).

PEER_CASES = [(m, model) for m in P.PEERS
              for model in ("mlp", "mnist_cnn", "cnn1m", "registration", "transformer", "resnet")]
#: (peer, model) pairs the peer cannot handle, and what its reason names: PReLU has no BackPACK /
#: nngeometry rule; BackPACK has none for GroupNorm, LayerNorm and attention, nngeometry none for Embedding;
#: Opacus refuses BatchNorm and cannot replay nn.MultiheadAttention (query, key, value).
UNSUPPORTED = {("backpack", "mnist_cnn"): "PReLU", ("nngeometry", "mnist_cnn"): "PReLU",
               ("nngeometry_gram", "mnist_cnn"): "PReLU", ("backpack", "transformer"): "LayerNorm, MultiheadAttention",
               ("opacus", "transformer"): "MultiheadAttention", ("nngeometry", "transformer"): "Embedding",
               ("nngeometry_gram", "transformer"): "Embedding", ("opacus", "resnet"): "BatchNorm2d",
               ("backpack", "registration"): "GroupNorm"}
N_PEER = 6


@pytest.fixture(scope="module")
def peer_reference():
    cache = {}

    def get(model):
        if model not in cache:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(M, "REGISTRATION_PATCH", SMALL_PATCH)
                b = M.make_bench(model, N_PEER, seed=3)
            cache[model] = (b, _reference(b))
        return cache[model]
    return get


def test_peers_listed_whether_installed_or_not():
    status = P.status()
    assert set(status) == {"backpack", "opacus", "nngeometry", "captum"}
    for module, text in status.items():
        assert text.startswith("installed (") == P.installed(module), text


@pytest.mark.parametrize("method,model", PEER_CASES)
def test_peer_equals_the_reference(method, model, peer_reference):
    if not P.installed(method):
        pytest.skip(f"{P.PEERS[method].dist} not installed (optional extra `bench`)")
    b, (G, K, _) = peer_reference(model)
    if (method, model) in UNSUPPORTED:
        with pytest.raises(P.PeerUnsupported, match=UNSUPPORTED[(method, model)]):
            P.prepare(method, b)
        return
    prepared = P.prepare(method, b)
    # BackPACK and Opacus hooks cannot follow ReLU(inplace=True): they run on an out-of-place copy
    inplace_copy = model == "registration" and method in ("backpack", "opacus")
    assert (prepared.variant is not None) == inplace_copy
    out = P.quiet(prepared.run)(b)
    if prepared.kind == "grads":
        _close(out, G, 1e-5 * G.abs().max().item())
        _close(M.dense_similarity(out.clone()), K, 1e-4)
    else:
        _close(M.correlation_from_gram(out), K, 1e-3)
    if method == "captum":
        # PReLU, GroupNorm, LayerNorm, Embedding, BatchNorm: beyond Captum's Linear / Conv2d sample-wise trick
        per_example = model not in ("mlp", "cnn1m")
        assert prepared.mode == ("per-example" if per_example else "sample-wise trick")


@pytest.mark.slow
def test_run_quick_smoke(tmp_path):
    """The runner end to end on the MLP with N = 64 (~15 s: every measurement forks a process)."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--only", "mlp",
                           "--sizes", "64", "--reps", "1", "--prefault-gb", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and res["settings"]["sizes"] == [64]
    assert {"cpu_model", "cores", "torch"} <= set(res["machine"])
    assert res["models"]["mlp"]["d"] == 1 and set(res["peers"]) == {"backpack", "opacus", "nngeometry", "captum"}
    rows = {(r["task"], r["method"]): r for r in res["results"] if r["model"] == "mlp"}
    for task in ("per_sample_grads", "soft_density", "similarity"):
        for method in ("layerwise", "jacobian", "naive", "vmap"):
            r = rows[(task, method)]
            assert r["status"] == "ok" and r["seconds"] > 0 and r["x_epoch"] > 0 and r["peak_extra_mb"] >= 0
            if method in ("naive", "vmap"):
                assert r["check"]["ok"] and r["check"]["against"] == "netsim.per_sample_grads"
    assert rows[("epoch", "epoch")]["x_epoch"] == 1.0
    assert res["gemm"]["gflops"] > 0 and res["memory"]["fault_s_per_gib"] > 0
    assert res["library"]["lib_sha256"] and res["soft_density_profile"]["mlp"]["total_s"] > 0
    goals = {g["goal"]: g for g in res["goals"]}
    assert all(isinstance(g["met"], bool) and g["target"] > 0 for g in goals.values())
    assert any("mlp" in k for k in goals) and any("GEMM" in k for k in goals)
    assert {t["threads"] for t in res["threads"]} == {1, 2}
    assert "goals:" in proc.stdout and "peers:" in proc.stdout
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
        {"model": "mnist_cnn", "n": 256, "task": "similarity", "method": "nngeometry_gram",
         "status": "error: PeerUnsupported: nngeometry: I do not know what to do with layer PReLU"},
        {"model": "registration", "n": 256, "task": "similarity", "method": "backpack", "status": "ok",
         "seconds": 50.0, "x_epoch": 10.0, "peak_extra_mb": 900.0, "variant": "copy with ReLU(inplace=False)"},
    ],
    "gemm": {"n": 2048, "gflops": 100.0},
    "peers": {"backpack": "installed (backpack-for-pytorch==1.7.1)", "captum": "not installed (PyPI: captum)"},
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
    assert "skipped (projected 999 s)" in md
    assert ("| nngeometry GramMatrix | error: PeerUnsupported: nngeometry: I do not know what to do with layer PReLU "
            "|") in md
    assert "| BackPACK BatchGrad (copy with ReLU(inplace=False)) | 50 | 10 | 900 |" in md
    assert "Peers: backpack installed (backpack-for-pytorch==1.7.1); captum not installed (PyPI: captum)." in md
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


def test_performance_summary_markdown(tmp_path):
    """The README's summary: how many goals are met and which are missed, then one row per model at the
    largest N where our soft density ran, our faster engine against the fastest other method, or why none ran."""
    row = lambda model, n, task, method, s, **kw: {"model": model, "n": n, "task": task,  # noqa: E731
                                                   "method": method, "status": "ok", "seconds": s, **kw}
    res = dict(RESULTS, models={"mlp": {"params": 21_057}, "cnn1m": {}, "registration": {}}, results=[
        row("mlp", 256, "soft_density", "layerwise", 9.0, x_epoch=3.0),   # a smaller N: not shown
        row("mlp", 1024, "soft_density", "layerwise", 2.0, x_epoch=2.5),
        row("mlp", 1024, "soft_density", "jacobian", 4.0),
        row("mlp", 1024, "soft_density", "naive", 8.0),
        row("mlp", 1024, "soft_density", "backpack", 6.0, variant="copy"),
        {"model": "mlp", "n": 1024, "task": "similarity", "method": "layerwise", "status": "skipped",
         "projected_s": 500.0},
        row("cnn1m", 4096, "soft_density", "layerwise", 30.0, x_epoch=2.2),
        row("cnn1m", 4096, "similarity", "layerwise", 80.0, x_epoch=7.0),
        {"model": "cnn1m", "n": 4096, "task": "soft_density", "method": "vmap", "status": "infeasible",
         "needs_gb": 21.2},
        {"model": "cnn1m", "n": 4096, "task": "similarity", "method": "naive", "status": "skipped",
         "projected_s": 900.0},
        {"model": "cnn1m", "n": 4096, "task": "similarity", "method": "captum", "status": "error: PeerUnsupported"},
        row("registration", 64, "similarity", "jacobian", 2.0, x_epoch=1.0),  # no soft density: no row
    ])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    md = report.performance_summary_markdown(path)
    assert md.startswith("**Goals: 1 of 2 met** (each with its note: [`bench/RESULTS.md`](bench/RESULTS.md)). "
                         "Missed: similarity at N=4096 <= 10x epoch: not measured.\n")
    assert "| Goal |" not in md   # every goal's row is in bench/RESULTS.md
    assert ("| mlp (21,057 params) | 1024 | 2 s = 2.5× epoch (ours: layerwise) vs 6 s (BackPACK BatchGrad (copy)): "
            "3× faster | ours: skipped (projected 500 s) |") in md
    assert ("| cnn1m | 4096 | 30 s = 2.2× epoch (ours: layerwise); none of the 1 others ran (G needs 21.2 GB) "
            "| 80 s = 7× epoch (ours: layerwise); none of the 2 others ran (projected ≥ 900 s, unsupported) |") in md
    assert "| registration" not in md and "| mlp (21,057 params) | 256 |" not in md
    slower = dict(res, results=[row("mlp", 8, "similarity", "jacobian", 3.0),
                                row("mlp", 8, "soft_density", "jacobian", 3.0),
                                row("mlp", 8, "similarity", "vmap", 1.5)])
    path.write_text(json.dumps(slower))
    md = report.performance_summary_markdown(path)
    assert ("3 s (ours: jacobian); no other method measured "
            "| 3 s (ours: jacobian) vs 1.5 s (torch.func vmap): 2× slower |") in md


def test_update_readme_writes_the_results_page_beside_the_results(tmp_path):
    bench = tmp_path / "results.json"
    bench.write_text(json.dumps(RESULTS))
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report.update_readme(readme, tmp_path / "figures", bench)
    page = (tmp_path / "RESULTS.md").read_text()
    assert page == report.results_page_markdown(bench)
    assert page.startswith("# Benchmark results\n") and page.endswith(report.performance_markdown(bench))
    assert "never edited by hand" in page


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
    assert f"{report.PERF_START}\n{report.performance_summary_markdown(bench)}{report.PERF_END}" in text
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
    out = tasks.child_measure("mlp", 128, task, cap=30.0, reps=2, rep_budget=100.0, mm_gflops=1e-6)
    rows = {r["task"]: r for r in out["rows"]}
    assert rows["similarity"]["status"] == "skipped" and rows["similarity"]["projected_s"] > 30
    assert rows["per_sample_grads"]["status"] == rows["soft_density"]["status"] == "ok"
    assert rows["soft_density"]["reps"] >= 2 and rows["soft_density"]["seconds"] >= rows["per_sample_grads"]["seconds"]


def test_merge_results_keeps_old_rows_and_lets_new_ones_win():
    row = lambda model, n, task, method, s: {"model": model, "n": n, "task": task, "method": method,  # noqa: E731
                                             "status": "ok", "seconds": s}
    old = {"mode": "full", "date": "d0", "models": {"mlp": {"available": True}}, "budgets": {"rows": []},
           "results": [row("mlp", 64, "epoch", "epoch", 1.0), row("mlp", 64, "similarity", "layerwise", 5.0)],
           "threads": [{"x": 1}], "soft_density_profile": {"mlp": {"total_s": 1}}, "timeline": [{"t": 0}]}
    new = {"mode": "full", "date": "d1", "models": {"cnn1m": {"available": True}},
           "results": [row("mlp", 64, "similarity", "layerwise", 4.0), row("cnn1m", 64, "epoch", "epoch", 2.0)],
           "threads": [], "soft_density_profile": {}, "timeline": [{"t": 1}]}
    old["results"].append(dict(row("mlp", 64, "soft_density", "layerwise", 3.0), x_epoch=3.0))
    new["results"].insert(0, dict(row("mlp", 64, "epoch", "epoch", 1.5), epoch_s=1.5))
    new["results"][1]["epoch_s"] = 1.5
    out = records.merge_results(old, new)
    assert [(r["model"], r["task"], r["seconds"]) for r in out["results"]] == [
        ("mlp", "epoch", 1.5), ("mlp", "similarity", 4.0), ("mlp", "soft_density", 3.0), ("cnn1m", "epoch", 2.0)]
    # every ratio stays against the epoch of its own run: the old soft density against 1.0 s
    assert [r.get("x_epoch") for r in out["results"][:3]] == [1.0, 4.0 / 1.5, 3.0]
    assert set(out["models"]) == {"mlp", "cnn1m"} and out["threads"] == [{"x": 1}]
    assert out["soft_density_profile"] == {"mlp": {"total_s": 1}} and len(out["timeline"]) == 2
    assert out["date"] == "d1" and out["merged"][0]["date"] == "d0" and out["budgets"] == {"rows": []}
    # the GEMM efficiency (and the torch.mm rate it was computed against) of the larger N wins
    old.update(gemm_efficiency={"n": 4096, "efficiency": 0.7}, gemm={"gflops": 100.0})
    new.update(gemm_efficiency={"n": 256, "efficiency": 0.9}, gemm={"gflops": 90.0})
    out = records.merge_results(old, new)
    assert out["gemm_efficiency"]["n"] == 4096 and out["gemm"]["gflops"] == 100.0
    new["gemm_efficiency"]["n"] = 8192
    assert records.merge_results(old, new)["gemm_efficiency"]["n"] == 8192


def test_goals_read_auto_first_and_race_the_transformer_engines():
    """Soft density: the `auto` row (what a user gets) where measured, else the layer-wise one;
    the transformer's similarity at N = 1024 against 10x epoch, and layer-wise vs Jacobian."""
    def row(model, n, task, method, x, status="ok", **extra):
        return {"model": model, "n": n, "task": task, "method": method, "status": status, "seconds": x,
                "x_epoch": x, **extra}
    res = {"mode": "full", "models": {"mlp": {"available": True}, "transformer": {"available": True}},
           "results": [row("mlp", 1024, "soft_density", "layerwise", 2.0),
                       row("mlp", 4096, "soft_density", "layerwise", 2.5),
                       row("transformer", 4096, "soft_density", "layerwise", 2.0),
                       row("transformer", 4096, "soft_density", "auto", 3.5, variant="picked jacobian"),
                       row("transformer", 1024, "similarity", "layerwise", 8.0),
                       row("transformer", 1024, "similarity", "jacobian", 12.0),
                       row("transformer", 1024, "similarity", "auto", 8.5, variant="picked layerwise")]}
    goals = {g["goal"]: g for g in records.evaluate_goals(res)}
    mlp, tr = goals["soft_density <= 3x epoch (mlp)"], goals["soft_density <= 3x epoch (transformer)"]
    assert (mlp["measured"], mlp["n"], mlp["met"]) == (2.5, 4096, True) and "auto not measured" in mlp["note"]
    assert (tr["measured"], tr["met"]) == (3.5, False) and "picked jacobian" in tr["note"]
    sim = goals["similarity (N x N) of transformer at N=1024 <= 10x epoch"]
    assert (sim["measured"], sim["met"]) == (8.5, True)
    race = goals["transformer similarity at N=1024: layer-wise / Jacobian time < 1 (layer-wise faster)"]
    assert race["measured"] == pytest.approx(8.0 / 12.0) and race["met"]
    res["results"] = [r for r in res["results"] if r["method"] != "jacobian"]
    goals = {g["goal"]: g for g in records.evaluate_goals(res)}
    race = goals["transformer similarity at N=1024: layer-wise / Jacobian time < 1 (layer-wise faster)"]
    assert race["measured"] is None and not race["met"]
    # a Hugging Face model: similarity and per-sample gradients at N = 1024, no engine race
    res["models"]["hf_bert"] = {"available": True}
    res["results"] += [row("hf_bert", 1024, "similarity", "layerwise", 11.0),
                       row("hf_bert", 1024, "per_sample_grads", "auto", 2.5, variant="picked layerwise"),
                       row("hf_bert", 4096, "per_sample_grads", "auto", 1.0, variant="picked layerwise")]
    goals = {g["goal"]: g for g in records.evaluate_goals(res)}
    sim, grads = (goals[f"{what} of hf_bert at N=1024 <= {x}x epoch"]
                  for what, x in (("similarity (N x N)", 10), ("per-sample gradients", 3)))
    assert (sim["measured"], sim["met"]) == (11.0, False) and "auto not measured" in sim["note"]
    assert (grads["measured"], grads["met"]) == (2.5, True) and "picked layerwise" in grads["note"]
    assert not any(g["goal"].startswith("hf_bert similarity") for g in goals.values())
    # its soft density is read at N = 4096 (issue #19), the larger N said in the note
    res["results"] += [row("hf_bert", 4096, "soft_density", "auto", 2.3, variant="picked layerwise"),
                       row("hf_bert", 16384, "soft_density", "auto", 4.0, variant="picked layerwise")]
    soft = {g["goal"]: g for g in records.evaluate_goals(res)}["soft_density <= 3x epoch (hf_bert)"]
    assert (soft["measured"], soft["n"], soft["met"]) == (2.3, 4096, True) and "at N=16384: 4x" in soft["note"]


def test_grads_check_accepts_float32_rounding_and_flags_a_wrong_g():
    """The G check passes netsim's own G, flags one entry off by 1 % of max |G|, and its
    tolerance is at least twice netsim's measured float32 rounding error (against float64)."""
    import baselines
    b = M.make_bench("mlp", 40)
    G = M.ours_grads(b)
    ok = baselines.check_grads(b, G)
    assert ok["ok"] and ok["n"] == baselines.CHECK_N and ok["max_rel_err"] == 0.0
    assert ok["tol"] == max(baselines.CHECK_RTOL_G, 2 * ok["netsim_float32_rel_err"])
    bad = G.clone()
    bad[3, 0, 7] += 0.01 * G.abs().max()
    wrong = baselines.check_grads(b, bad)
    assert not wrong["ok"] and wrong["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
    row = baselines.attach_check({"status": "ok"}, wrong)
    assert row["status"].startswith("mismatch: differs from netsim.per_sample_grads")


def _scale_row(n: int, query_ms: float, recall: float) -> dict:
    return {"n": n, "epoch_s": n / 1000, "build_s": n / 500, "index_bytes": 4200 * n, "ann_build_s": n / 4000,
            "ann_bytes": 1100 * n, "nlist": 4000, "exact_query_ms": n / 10_000, "default_nprobe": 125,
            "approximate": [{"nprobe": 8, "query_ms": query_ms / 2, "recall_at_10": 0.9},
                            {"nprobe": 125, "query_ms": query_ms, "recall_at_10": recall}]}


def test_index_scale_table_reads_the_goals_at_a_million_and_projects_the_slopes(tmp_path):
    path = tmp_path / "index_scale_results.json"
    res = {"sizes": [_scale_row(200_000, 10.0, 0.99), _scale_row(1_000_000, 60.0, 0.97)], "data": "d", "sketch": 1024,
           "epoch_50k_s": 50.0}
    path.write_text(json.dumps(res))
    md = report.index_scale_markdown(path)
    assert md.startswith("**Goals at 1,000,000 samples: 3 of 4 met**: approximate query 60.0 ms (≤ 50 ms, missed); "
                         "its recall@10 0.970 (≥ 0.95);")
    assert "| 1,000,000 | 2.00 | 0.25 |" in md and "60.0 ms, 0.970 (nprobe 125 of 4000)" in md
    assert "| 200,000 |" in md and "8: 5.0 ms" not in md   # nprobe 8's recall 0.9 < 0.95: not the smallest good one
    assert "the exact query 10 s (linear)" in md            # 100 ms x 100
    # query time 10 -> 60 ms over 5x N: N^1.11, projected over 100x more samples
    assert f"the approximate one {60 * 100 ** (math.log(6) / math.log(5)):.0f} ms (N^1.11" in md
    res["sizes"] = res["sizes"][:1]
    path.write_text(json.dumps(res))
    assert "Goals" not in report.index_scale_markdown(path) and "Projection" not in report.index_scale_markdown(path)
