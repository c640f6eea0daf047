"""netsim.ann: the approximate search of a SimilarityIndex equals the exact streamed search where it
is exhaustive, measures its recall where it is not, resumes a killed build, refuses a stale index,
and says which package is missing."""

import json

import pytest
import torch

import netsim
from conftest import mlp
from netsim import ann, layerwise, store

pytest.importorskip("faiss")


def _index(tmp_path, n=600, sketch=64, name="i"):
    model = mlp(d_in=6, hidden=24, d_out=2, seed=3).eval()
    xs = torch.randn(n, 6, generator=torch.Generator().manual_seed(4))
    return model, xs, netsim.SimilarityIndex.build(model, xs, tmp_path / name, sketch=sketch, shard_size=128)


def test_flat_vectors_give_the_trace_gram_of_factored_and_dense_entries():
    model = mlp(d_in=5, hidden=40, d_out=2, seed=1).double()
    factors = layerwise.factorise(model, torch.randn(7, 5, dtype=torch.float64))
    assert any(isinstance(f, layerwise.LinearFactors) for f in factors)
    flat = ann.flat(factors)
    torch.testing.assert_close(flat @ flat.T, layerwise.gram(factors, factors, trace=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sketch", [None, 64])
def test_an_exhaustive_approximate_search_is_the_exact_search(tmp_path, sketch):
    """nprobe = nlist: every list is scanned, so the candidates hold the exact top k, and their
    re-ranked values are the index's own k^C."""
    model, xs, index = _index(tmp_path, sketch=sketch)
    index.build_ann(nlist=8)
    queries = torch.randn(30, 6, generator=torch.Generator().manual_seed(9))
    exact = index.query(queries, k=5)
    approximate = index.query(queries, k=5, search="approximate", nprobe=8)
    assert torch.equal(approximate[1], exact[1])
    torch.testing.assert_close(approximate[0], exact[0], rtol=1e-5, atol=1e-6)
    values, ids = index.neighbours(k=4)
    a_values, a_ids = index.neighbours(k=4, search="approximate", nprobe=8)
    assert torch.equal(a_ids, ids)
    torch.testing.assert_close(a_values, values, rtol=1e-5, atol=1e-6)
    assert index.calibrate_ann(n_queries=40, nprobe=8)["ann_recall_at_k"] == 1.0


def test_recall_is_measured_where_the_search_is_not_exhaustive(tmp_path):
    _, _, index = _index(tmp_path, n=3000)
    index.build_ann(nlist=32)
    few, more = (index.calibrate_ann(n_queries=100, nprobe=p, candidates=40)["ann_recall_at_k"] for p in (1, 8))
    assert 0 < few < more <= 1.0 and more > 0.8, (few, more)
    report = index.calibrate(torch.randn(3000, 6, generator=torch.Generator().manual_seed(4)), n_pairs=50)
    assert 0 < report["ann_recall_at_k"] <= 1 and report["ann_k"] == 10    # calibrate reports it too


def test_a_killed_build_resumes_and_a_rebuilt_shard_is_detected(tmp_path, monkeypatch):
    model, xs, index = _index(tmp_path)
    written, real = [], ann._write

    def killed_after_two(faiss, faiss_index, path):
        if path.name.startswith("shard_") and len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        real(faiss, faiss_index, path)

    monkeypatch.setattr(ann, "_write", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        index.build_ann(nlist=8)
    monkeypatch.setattr(ann, "_write", lambda f, i, p: written.append(p.name) or real(f, i, p))
    index.build_ann(nlist=8)
    shards = [name for name in written if name.startswith("shard_")]
    assert shards == ["shard_00000.faiss", "shard_00001.faiss", "shard_00002.faiss", "shard_00003.faiss",
                      "shard_00004.faiss"]                                 # the first two parts were not redone
    # a shard rebuilt after the approximate index (other checksums): refused, then brought up to date
    meta = index.manifest["shards"][2]
    meta["files"] = {name: "0" * 64 for name in meta["files"]}
    with pytest.raises(ValueError, match="older than the index's shards.*build_ann"):
        netsim.SimilarityIndex(index.path, index.manifest, model, None, None, None).query(xs[:3], search="approximate")
    written.clear()
    index.build_ann(nlist=8)
    assert [name for name in written if name.startswith("shard_")] == ["shard_00002.faiss"]


def test_missing_faiss_and_other_kernels_are_refused_clearly(tmp_path, monkeypatch):
    model, xs, index = _index(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"call index.build_ann\(\) first"):
        index.query(xs[:2], search="approximate")
    index.build_ann(nlist=8)
    with pytest.raises(ValueError, match="search='approximate' ranks by the full k\\^C"):
        index.query(xs[:2], kind="inner", search="approximate")
    with pytest.raises(ValueError, match="search must be one of"):
        index.query(xs[:2], search="fast")
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)      # as if faiss-cpu were not installed
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        netsim.SimilarityIndex.open(index.path, model).query(xs[:2], search="approximate")
    assert json.loads((index.path / "ann" / "meta.json").read_text())["settings"]["nlist"] == 8
    assert store.read_manifest(index.path)["complete"]


def test_results_are_k_wide_and_recall_counts_real_neighbours_only(tmp_path):
    """Fewer candidates than k are refused (the results would be narrower than asked); on an index of
    6 samples, recall@10 is over the 5 others, never inflated by the padding."""
    model, xs, index = _index(tmp_path)
    index.build_ann(nlist=8)
    assert index.query(xs[:3], k=7, search="approximate", nprobe=8)[1].shape == (3, 7)
    with pytest.raises(ValueError, match=r"candidates \(5\) must be at least k \(7\)"):
        index.query(xs[:3], k=7, search="approximate", candidates=5)
    _, _, small = _index(tmp_path, n=6, name="small")
    small.build_ann(nlist=1)
    report = small.calibrate_ann(n_queries=6, k=10, nprobe=1)
    assert report["ann_k"] == 5 and report["ann_recall_at_k"] == 1.0, report


def test_calibrate_keeps_its_result_beside_a_stale_approximate_index(tmp_path):
    model, xs, index = _index(tmp_path)
    index.build_ann(nlist=8)
    meta = json.loads((index.path / "ann" / "meta.json").read_text())
    (index.path / "ann" / "meta.json").write_text(json.dumps(dict(meta, fingerprint="0" * 16)))   # stale
    report = netsim.SimilarityIndex.open(index.path, model).calibrate(xs, n_pairs=50)
    assert "ann_recall_at_k" not in report and store.read_manifest(index.path)["calibration"] == report
