"""SimilarityIndex: an exact index equals the streamed kernels on every supported layer type (both engines, every
kind), data forms, resumption after a killed build, fingerprint refusal, corrupt shards, sketches and their
calibrated error, and a build sharded over processes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import netsim
from conftest import SmallCNN, TinyResNet, TinyTransformer, mlp, token_batch
from netsim import store
from netsim.outputs import class_vs_rest

KINDS = ("inner", "influence", "correlation")   # correlation last: the checks after the kinds' loop use it


class NormsNet(nn.Module):
    """Conv1d -> GroupNorm -> flatten -> LayerNorm -> Linear: the remaining layer rules."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv1d(2, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(24)
        self.head = nn.Linear(24, 2)

    def forward(self, x):
        return self.head(self.ln(torch.tanh(self.gn(self.conv(x))).flatten(1)))


class Recurrent(nn.Module):
    """An LSTM: no layer-wise rule, the Jacobian engine only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _cases():
    g = torch.Generator().manual_seed(0)
    return {
        "mlp": (mlp(d_in=3, hidden=24, d_out=2, dtype=torch.float64), torch.randn(40, 3, generator=g).double()),
        "cnn_batchnorm": (SmallCNN().double().eval(), torch.randn(40, 1, 8, 8, generator=g).double()),
        "resnet": (TinyResNet().double().eval(), torch.randn(40, 1, 6, 6, generator=g).double()),
        "conv1d_norms": (NormsNet().double(), torch.randn(40, 2, 8, generator=g).double()),
        "transformer": (TinyTransformer().double().eval(), token_batch(40)),
        "lstm": (Recurrent(), torch.randn(40, 4, 3, generator=g)),   # float32: vmap over a float64 LSTM fails in torch
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
def test_exact_index_equals_streamed_kernels(tmp_path, name, method):
    model, xs = CASES[name]
    if name == "lstm" and method == "layerwise":
        pytest.skip("no layer-wise rule for LSTM (auto uses the Jacobian engine)")
    tol = dict(rtol=1e-9, atol=1e-10) if next(model.parameters()).dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    index = netsim.SimilarityIndex.build(model, xs, tmp_path / "i", shard_size=16, method=method)
    assert len(index) == 40 and len(index.manifest["shards"]) == 3 and index.manifest["sketch_plan"] is None
    queries = xs[:7]
    for kind in KINDS if name in ("mlp", "cnn_batchnorm") else ("correlation",):
        full = netsim.similarity(model, xs, kind=kind, method="jacobian")     # the reference, all pairs
        torch.testing.assert_close(index.similarity(queries, kind=kind), full[:7], **tol)
    values, indices = index.query(queries, k=5)
    torch.testing.assert_close(values, full[:7].topk(5, 1).values, **tol)
    torch.testing.assert_close(full[:7].gather(1, indices), values, **tol)
    off_self = full.clone().fill_diagonal_(-torch.inf)
    values, indices = index.neighbours(k=3)
    torch.testing.assert_close(values, off_self.topk(3, 1).values, **tol)
    assert not (indices == torch.arange(40)[:, None]).any()
    torch.testing.assert_close(index.soft_density(), full.sum(1), **tol)
    torch.testing.assert_close(index.soft_density(queries), full[:7].sum(1), **tol)
    parts = index.explain(3, 11)
    by_module = netsim.similarity_by_module(model, xs[[3]], xs[[11]], method="jacobian")
    assert list(parts) == list(by_module)
    for module, value in parts.items():
        assert value == pytest.approx(float(by_module[module]), abs=tol["atol"])
    assert sum(parts.values()) == pytest.approx(float(full[3, 11]), abs=tol["atol"])


@pytest.mark.parametrize("kind", ["inner", "influence"])   # k^N is asymmetric: every shard pair is computed
def test_neighbours_of_the_other_kinds(tmp_path, kind):
    model, xs = CASES["mlp"]
    index = netsim.SimilarityIndex.build(model, xs, tmp_path / "i", shard_size=16)
    full = netsim.similarity(model, xs, kind=kind).fill_diagonal_(-torch.inf)
    torch.testing.assert_close(index.neighbours(k=4, kind=kind)[0], full.topk(4, 1).values)


def test_data_forms_and_targets(tmp_path):
    """A DataLoader of (x, y) batches with a class-vs-rest output equals the tensor with targets=; the index
    answers queries with their own targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    xs, ys = torch.randn(50, 5, dtype=torch.float64), torch.randint(0, 4, (50,))
    loader = DataLoader(TensorDataset(xs, ys), batch_size=7)
    a = netsim.SimilarityIndex.build(model, loader, tmp_path / "a", output_fn=class_vs_rest, shard_size=20)
    b = netsim.SimilarityIndex.build(model, xs, tmp_path / "b", targets=ys, output_fn=class_vs_rest, shard_size=20)
    expected = netsim.similarity(model, xs[:6], xs, output_fn=class_vs_rest, x_targets=ys[:6], y_targets=ys)
    for index in (a, b):
        torch.testing.assert_close(index.similarity(xs[:6], targets=ys[:6]), expected)
        torch.testing.assert_close(index.soft_density(),
                                   netsim.soft_density(model, xs, output_fn=class_vs_rest, targets=ys))


@pytest.mark.parametrize("method", ["layerwise", "jacobian"])
def test_dict_batches_reach_both_engines(tmp_path, method):
    model = TinyTransformer().double().eval()
    tokens, mask = token_batch(12, padded=True)
    batches = [{"tokens": tokens[i:i + 5], "padding_mask": mask[i:i + 5]} for i in range(0, 12, 5)]
    index = netsim.SimilarityIndex.build(model, batches, tmp_path / "i", shard_size=8, method=method)
    assert index.manifest["engine"] == method
    torch.testing.assert_close(index.similarity(batches[:1]),
                               netsim.similarity(model, batches[:1], batches, method="jacobian"))


def test_params_selection(tmp_path):
    model, xs = CASES["cnn_batchnorm"]
    index = netsim.SimilarityIndex.build(model, xs, tmp_path / "i", params=["head.*"])
    torch.testing.assert_close(index.similarity(xs[:4]), netsim.similarity(model, xs[:4], xs, params=["head.*"]))
    assert list(index.explain(0, 1)) == ["head"]
    with pytest.raises(ValueError, match="does not match"):
        netsim.SimilarityIndex.open(tmp_path / "i", model)           # the selection is part of the index


def test_reopen_and_fingerprint_refusal(tmp_path):
    model, xs = CASES["mlp"]
    built = netsim.SimilarityIndex.build(model, xs, tmp_path / "i", shard_size=16)
    again = netsim.SimilarityIndex.open(tmp_path / "i", model)
    torch.testing.assert_close(again.similarity(xs[:3]), built.similarity(xs[:3]))
    manifest = again.manifest
    assert manifest["count"] == 40 and manifest["complete"] and manifest["versions"]["torch"] == torch.__version__
    assert manifest["build_wall_s"] > 0
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 16), (16, 32), (32, 40)]
    other = mlp(d_in=3, hidden=24, d_out=2, dtype=torch.float64)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-12                    # the smallest change of a value is another model
    with pytest.raises(ValueError, match="parameters or buffers differ"):
        netsim.SimilarityIndex.open(tmp_path / "i", other)
    with pytest.raises(FileExistsError, match="other settings"):
        netsim.SimilarityIndex.build(other, xs, tmp_path / "i")      # never overwritten
    with pytest.raises(ValueError, match="output_fn"):
        netsim.SimilarityIndex.open(tmp_path / "i", model, output_fn=netsim.outputs.neg_log_softmax)
    assert (tmp_path / "i" / "shard_00000").exists()
    with pytest.raises(FileNotFoundError, match="no SimilarityIndex"):
        netsim.SimilarityIndex.open(tmp_path / "nothing", model)


def test_corrupt_shard_is_detected(tmp_path):
    model, xs = CASES["mlp"]
    netsim.SimilarityIndex.build(model, xs, tmp_path / "i", shard_size=16)
    file = next((tmp_path / "i" / "shard_00001").glob("*.npy"))
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    index = netsim.SimilarityIndex.open(tmp_path / "i", model)
    with pytest.raises(netsim.CorruptIndexError, match="shard_00001"):
        index.query(xs[:2])
    with pytest.raises(netsim.CorruptIndexError):
        index.verify()
    file.unlink()
    with pytest.raises(netsim.CorruptIndexError, match="missing"):
        netsim.SimilarityIndex.open(tmp_path / "i", model).soft_density()


_KILLED_BUILD = textwrap.dedent("""
    import sys, time, torch, netsim
    from torch.utils.data import Dataset
    sys.path.insert(0, {tests!r})
    from conftest import mlp

    class Slow(Dataset):   # slow after the first shards, so the parent can kill the build part-way
        def __init__(self, xs): self.xs = xs
        def __len__(self): return len(self.xs)
        def __getitem__(self, i):
            if i >= 32: time.sleep(0.05)
            return self.xs[i]

    xs = torch.randn(80, 3, generator=torch.Generator().manual_seed(0)).double()
    netsim.SimilarityIndex.build(mlp(d_in=3, hidden=24, d_out=2, dtype=torch.float64), Slow(xs), {path!r},
                                 shard_size=16, chunk_size=4)
""")


def test_killed_build_resumes_at_the_first_incomplete_shard(tmp_path):
    path = tmp_path / "i"
    script = _KILLED_BUILD.format(tests=str(Path(__file__).parents[1]), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (path / "shard_00001" / "meta.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((path / "manifest.json").read_text())
    assert not manifest["complete"] and 2 <= len(manifest["shards"]) < 5
    kept = {s["index"]: (path / f"shard_{s['index']:05d}" / "meta.json").stat().st_mtime_ns
            for s in manifest["shards"]}

    model = mlp(d_in=3, hidden=24, d_out=2, dtype=torch.float64)
    xs = torch.randn(80, 3, generator=torch.Generator().manual_seed(0)).double()
    seen = []
    handle = model[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    index = netsim.SimilarityIndex.build(model, xs, path, shard_size=16, chunk_size=4)
    handle.remove()
    assert len(index) == 80 and index.manifest["complete"]
    # the completed shards were kept, not recomputed: the model saw the remaining samples only (plus probes)
    for s, mtime in kept.items():
        assert (path / f"shard_{s:05d}" / "meta.json").stat().st_mtime_ns == mtime
    assert sum(seen) < 80
    assert not list(path.glob(".*.tmp"))
    torch.testing.assert_close(index.similarity(xs[:5]), netsim.similarity(model, xs[:5], xs))


def test_sketch_is_seeded_bounded_and_calibrated(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    xs = torch.randn(400, 20, dtype=torch.float64)
    a = netsim.SimilarityIndex.build(model, xs, tmp_path / "a", sketch=48, seed=1)
    b = netsim.SimilarityIndex.build(model, xs, tmp_path / "b", sketch=48, seed=1)
    c = netsim.SimilarityIndex.build(model, xs, tmp_path / "c", sketch=48, seed=2)
    assert a.manifest["values_per_sample"] <= 48 + len(a.manifest["layout"])
    assert any(e["kind"] != "exact" for e in a.manifest["sketch_plan"]["entries"])
    sa, sb, sc = (i.similarity(xs[:50]) for i in (a, b, c))
    torch.testing.assert_close(sa, sb, rtol=0, atol=0)                  # seeded
    assert not torch.equal(sa, sc)
    exact = netsim.similarity(model, xs[:50], xs)
    assert (sa.abs() <= 1).all()
    assert sa[torch.arange(50), torch.arange(50)].sub(1).abs().max() < 1e-12   # its own normalisation
    report = a.calibrate(xs, n_pairs=3000, seed=0)
    assert report == json.loads((tmp_path / "a" / "manifest.json").read_text())["calibration"]
    assert 0 < report["median_abs_err"] < report["p99_abs_err"] < 0.5
    # the measured error bar holds on other pairs: about 1% of them beyond the p99
    beyond = ((sa - exact).abs() > report["p99_abs_err"]).double().mean()
    assert beyond < 0.05
    # and the sketch keeps most neighbours
    top_exact, top_sketch = exact.topk(10, 1).indices, a.query(xs[:50], k=10)[1]
    recall = sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(top_exact, top_sketch)) / 500
    assert recall > 0.5


@pytest.mark.parametrize("bad, error", [(dict(sketch=0), ValueError), (dict(sketch=2.5), ValueError),
                                        (dict(shard_size=0), ValueError), (dict(method="fast"), ValueError),
                                        (dict(on_zero="ignore"), ValueError)])
def test_bad_arguments_are_refused_before_any_write(tmp_path, bad, error):
    model, xs = CASES["mlp"]
    with pytest.raises(error):
        netsim.SimilarityIndex.build(model, xs, tmp_path / "i", **bad)
    assert not (tmp_path / "i").exists()


def test_path_that_is_a_file_and_incomplete_open(tmp_path):
    model, xs = CASES["mlp"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError):
        netsim.SimilarityIndex.build(model, xs, tmp_path / "f")
    index = netsim.SimilarityIndex.build(model, xs, tmp_path / "i", shard_size=16)
    manifest = dict(index.manifest, complete=False)
    (tmp_path / "i" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete"):
        netsim.SimilarityIndex.open(tmp_path / "i", model)
    with pytest.raises(ValueError, match="k must be"):
        index.query(xs[:1], k=0)
    with pytest.raises(IndexError):
        index.explain(0, 40)


def test_zero_gradients_are_refused_at_build(tmp_path):
    model = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)           # every ReLU off: zero gradients w.r.t. the first layer and...
        model[2].weight.zero_()
        model[2].bias.zero_()
    model[2].requires_grad_(False)
    with pytest.raises(netsim.ZeroGradientError):
        netsim.SimilarityIndex.build(model, torch.randn(5, 2, dtype=torch.float64), tmp_path / "i")


def _build_worker(rank, world, port, path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, xs = _cases()["mlp"]
        netsim.SimilarityIndex.build(model, xs, path, shard_size=8, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_build_sharded_over_processes_equals_single_process(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import _free_port

    mp.start_processes(_build_worker, args=(2, _free_port(), str(tmp_path / "i")), nprocs=2, start_method="spawn")
    model, xs = CASES["mlp"]
    index = netsim.SimilarityIndex.open(tmp_path / "i", model)
    assert len(index) == 40 and len(index.manifest["shards"]) == 5
    torch.testing.assert_close(index.similarity(xs), netsim.similarity(model, xs, xs))


# --- independent workers: num_shards / shard_id ------------------------------------------------

WORKER_SCRIPT = """
import sys, torch, netsim
sys.path.insert(0, sys.argv[3])
from conftest import mlp
torch.manual_seed(0)
model = mlp(d_in=3, hidden=16, d_out=2, seed=int(sys.argv[4])).eval()
xs = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
index = netsim.SimilarityIndex.build(model, xs, sys.argv[1], shard_size=8, sketch=16, num_shards=3,
                                     shard_id=int(sys.argv[2]))
print("complete" if index is not None else "waiting")
"""


def _worker(path, shard_id, model_seed=0) -> subprocess.Popen:
    tests = str(Path(__file__).resolve().parents[1])
    return subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(path), str(shard_id), tests, str(model_seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _worker_setting():
    model = mlp(d_in=3, hidden=16, d_out=2, seed=0).eval()
    return model, torch.randn(50, 3, generator=torch.Generator().manual_seed(1))


def test_independent_workers_build_the_single_process_index_bit_for_bit(tmp_path):
    """Three processes started together, each writing its slice: the same shards, byte for byte, as
    one process; the last to finish completes the index (the others return None)."""
    workers = [_worker(tmp_path / "sharded", s) for s in range(3)]
    outputs = [w.communicate()[0].strip() for w in workers]
    assert all(w.returncode == 0 for w in workers) and outputs.count("complete") >= 1, outputs
    model, xs = _worker_setting()
    single = netsim.SimilarityIndex.build(model, xs, tmp_path / "single", shard_size=8, sketch=16)
    sharded = netsim.SimilarityIndex.open(tmp_path / "sharded", model)
    assert len(sharded) == 50 and sharded.manifest["num_shards"] == 3
    for a, b in zip(single.manifest["shards"], sharded.manifest["shards"]):
        assert a["files"] == b["files"] and (a["start"], a["stop"]) == (b["start"], b["stop"])
    assert torch.equal(sharded.similarity(xs), single.similarity(xs))


def test_a_missing_slice_is_named_and_a_killed_worker_resumes_its_own(tmp_path, monkeypatch):
    model, xs = _worker_setting()
    build = lambda shard_id: netsim.SimilarityIndex.build(  # noqa: E731
        model, xs, tmp_path, shard_size=8, sketch=16, num_shards=3, shard_id=shard_id)
    assert build(0) is None and build(2) is None        # 7 shards: worker 0 has 0-1, 1 has 2-3, 2 has 4-6
    with pytest.raises(ValueError, match=r"misses 2 shard\(s\): shard 2 \(samples 16-23, the slice of worker 1 "
                                         r"\(shard_id=1\) of 3\); shard 3"):
        netsim.SimilarityIndex.merge(tmp_path, model)
    written = []
    real_write = store.write_shard

    def killed_after_one(*args, **kwargs):   # the worker dies after its first shard
        if written:
            raise KeyboardInterrupt
        written.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(store, "write_shard", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        build(1)
    monkeypatch.setattr(store, "write_shard", lambda *a, **k: written.append(a[1]) or real_write(*a, **k))
    index = build(1)                                     # resumes: only shard 3 is written again
    assert written == [2, 3] and len(index) == 50
    single = netsim.SimilarityIndex.build(model, xs, tmp_path / "single", shard_size=8, sketch=16)
    assert torch.equal(index.similarity(xs), single.similarity(xs))


def test_slices_of_another_model_or_settings_are_refused_and_named(tmp_path):
    model, xs = _worker_setting()
    assert netsim.SimilarityIndex.build(model, xs, tmp_path, shard_size=8, sketch=16, num_shards=3, shard_id=0) is None
    other = _worker(tmp_path, 1, model_seed=5)          # another model: refused before it writes anything
    err = other.communicate()[1]
    assert other.returncode != 0 and "the model's parameters or buffers differ" in err
    with pytest.raises(FileExistsError, match="other settings.*sketch: index 16, now 32"):
        netsim.SimilarityIndex.build(model, xs, tmp_path, shard_size=8, sketch=32, num_shards=3, shard_id=1)
    with pytest.raises(FileExistsError, match="being built by 3 workers, not 2"):
        netsim.SimilarityIndex.build(model, xs, tmp_path, shard_size=8, sketch=16, num_shards=2, shard_id=1)
    with pytest.raises(ValueError, match="over 50 samples, but this data has 49"):
        netsim.SimilarityIndex.build(model, xs[:49], tmp_path, shard_size=8, sketch=16, num_shards=3, shard_id=1)
    with pytest.raises(FileExistsError, match=r"by 3 independent workers \(num_shards=3\).*merge"):
        netsim.SimilarityIndex.build(model, xs, tmp_path, shard_size=8, sketch=16)   # would redo their slices
    plain = tmp_path / "plain"                          # and a worker never joins one build's directory
    netsim.SimilarityIndex.build(model, xs, plain, shard_size=8, sketch=16)
    manifest = json.loads((plain / store.MANIFEST).read_text())
    (plain / store.MANIFEST).write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(FileExistsError, match="as one build"):
        netsim.SimilarityIndex.build(model, xs, plain, shard_size=8, sketch=16, num_shards=3, shard_id=0)
    # a shard that reached the directory from another index (another stamp) is named at the merge
    build = lambda shard_id: netsim.SimilarityIndex.build(  # noqa: E731
        model, xs, tmp_path, shard_size=8, sketch=16, num_shards=3, shard_id=shard_id)
    assert build(1) is None and build(2) is not None      # the last slice completes the index
    meta_file = tmp_path / store.shard_name(3) / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, stamp="0" * 16)))
    manifest = json.loads((tmp_path / store.MANIFEST).read_text())
    (tmp_path / store.MANIFEST).write_text(json.dumps(dict(manifest, complete=False)))
    with pytest.raises(ValueError, match=r"shard 3 \(samples 24-31, the slice of worker 1 \(shard_id=1\) of 3\).*"
                                         "other settings"):
        netsim.SimilarityIndex.open(tmp_path, model)


@pytest.mark.parametrize("num_shards, shard_id, match", [(0, 0, "num_shards"), (2, 2, r"shard_id must be an int in "
                                                                                      r"\[0, num_shards\)"),
                                                        (2, None, "shard_id"), (None, 1, "num_shards")])
def test_bad_worker_options_are_refused(tmp_path, num_shards, shard_id, match):
    model, xs = _worker_setting()
    with pytest.raises((ValueError, TypeError), match=match):
        netsim.SimilarityIndex.build(model, xs, tmp_path, num_shards=num_shards, shard_id=shard_id)
    assert not tmp_path.joinpath(store.MANIFEST).exists()


# --- per-module queries ---------------------------------------------------------------------------

def test_queries_of_some_modules_equal_the_kernel_of_their_parameters_alone(tmp_path):
    """query(modules=[...]) on an exact index = the similarity with only those modules' parameters."""
    model, xs = CASES["mlp"]
    index = netsim.SimilarityIndex.build(model, xs, tmp_path, shard_size=16)
    queries = xs[:5]
    for modules in (["2"], ["0", "4"]):
        expected = netsim.similarity(model, queries, xs, params=[f"{m}.*" for m in modules])
        torch.testing.assert_close(index.similarity(queries, modules=modules), expected, rtol=1e-5, atol=1e-6)
        values, ids = index.query(queries, k=4, modules=modules)
        torch.testing.assert_close(values, expected.topk(4, 1).values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(index.similarity(queries, modules=["0", "2", "4"]), index.similarity(queries))
    with pytest.raises(ValueError, match=r"\['9'\] are not among them: \['0', '2', '4'\]"):
        index.query(queries, modules=["9"])


def _recall(true_top, found) -> list[int]:
    return [len(set(t.tolist()) & set(f.tolist())) for t, f in zip(true_top, found)]


def test_refine_ranks_the_proposals_by_exact_kc(tmp_path):
    """refine: the exact top k among the sketch's proposals. With every sample proposed it is the exact top k;
    with fewer, each query keeps at least the sketch's own hits (the sketch's top k is among its proposals),
    and every returned value is the exact k^C of the returned sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    xs, queries = torch.randn(300, 20, dtype=torch.float64), torch.randn(30, 20, dtype=torch.float64)
    index = netsim.SimilarityIndex.build(model, xs, tmp_path, sketch=16, shard_size=64)
    exact = netsim.similarity(model, queries, xs)
    true_values, true_top = exact.topk(5, 1)
    values, ids = index.refine(queries, xs, k=5, candidates=300)
    torch.testing.assert_close(values, true_values, rtol=1e-10, atol=1e-12)
    assert torch.equal(ids, true_top)
    sketched = index.query(queries, k=5)[1]
    values, ids = index.refine(queries, xs, k=5, candidates=40)
    torch.testing.assert_close(values, exact.gather(1, ids), rtol=1e-10, atol=1e-12)
    assert (values[:, :-1] >= values[:, 1:]).all()
    refined, plain = _recall(true_top, ids), _recall(true_top, sketched)
    assert all(r >= p for r, p in zip(refined, plain)) and sum(refined) > sum(plain)
    # blocks of queries (a budget of a few rows) give the same answer
    small = netsim.SimilarityIndex.open(tmp_path, model, memory_budget=4 * 40 * 9)
    assert torch.equal(small.refine(queries, xs, k=5, candidates=40)[1], ids)


def test_refine_on_dict_batches_and_bad_input(tmp_path):
    model, tokens = CASES["transformer"]
    batches = [{"tokens": tokens[s:s + 8]} for s in range(0, 40, 8)]

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens):
            return self.inner(tokens)

    wrapped = Keywords()
    index = netsim.SimilarityIndex.build(wrapped, batches, tmp_path, sketch=32, shard_size=16)
    values, ids = index.refine(batches[:1], batches, k=3, candidates=40)
    exact = netsim.similarity(wrapped, batches[:1], batches)
    torch.testing.assert_close(values, exact.topk(3, 1).values, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="data holds 39 samples, the index 40"):
        index.refine(tokens[:2], tokens[:39], k=3)
    with pytest.raises(ValueError, match=r"candidates \(2\) must be at least k \(3\)"):
        index.refine(tokens[:2], tokens, k=3, candidates=2)
