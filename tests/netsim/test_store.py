"""netsim.store: shards round-trip exactly through memory-mapped .npy files, writes are atomic,
and damaged files are named, never read."""

import json

import pytest
import torch

from netsim import layerwise, store


def _factors(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [layerwise.LinearFactors(torch.randn(n, 4, generator=g), torch.randn(n, 2, 3, generator=g),
                                    True, True, ("fc.weight", "fc.bias")),
            layerwise.DenseFactors(torch.randn(n, 2, 7, generator=g), ("conv.weight",))]


LAYOUT = [{"type": "linear", "names": ["fc.weight", "fc.bias"], "bias": True, "weight": True},
          {"type": "dense", "names": ["conv.weight"]}]


def test_a_shard_round_trips_exactly(tmp_path):
    factors = _factors()
    meta = store.write_shard(tmp_path, 3, 40, factors)
    assert (meta["index"], meta["start"], meta["stop"]) == (3, 40, 45)
    assert store.completed_shards(tmp_path) == [meta]
    store.verify_shard(tmp_path, meta)
    back = store.read_shard(tmp_path, meta, LAYOUT, "cpu")
    assert torch.equal(back[0].x, factors[0].x) and torch.equal(back[0].delta, factors[0].delta)
    assert back[0].names == ("fc.weight", "fc.bias") and back[0].bias and back[0].weight
    assert torch.equal(back[1].grads, factors[1].grads) and back[1].names == ("conv.weight",)
    assert not list(tmp_path.glob(".*"))   # no temporary left behind


def test_a_completed_shard_is_kept_not_overwritten(tmp_path):
    first = store.write_shard(tmp_path, 0, 0, _factors(seed=0))
    again = store.write_shard(tmp_path, 0, 0, _factors(seed=1))   # e.g. another rank finishing the same shard
    assert again == first
    store.verify_shard(tmp_path, first)
    assert torch.equal(store.read_shard(tmp_path, first, LAYOUT, "cpu")[1].grads, _factors(seed=0)[1].grads)


def test_damaged_and_missing_files_are_named(tmp_path):
    meta = store.write_shard(tmp_path, 0, 0, _factors())
    file = tmp_path / "shard_00000" / "e1_grads.npy"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(store.CorruptIndexError, match="e1_grads.npy does not match its SHA-256"):
        store.verify_shard(tmp_path, meta)
    file.unlink()
    with pytest.raises(store.CorruptIndexError, match="e1_grads.npy is missing"):
        store.verify_shard(tmp_path, meta)


def test_partial_writes_are_removed_and_ignored(tmp_path):
    store.write_shard(tmp_path, 0, 0, _factors())
    (tmp_path / ".shard_00001.999.tmp").mkdir()        # what a killed build leaves
    (tmp_path / ".manifest.json.999.tmp").write_text("{")
    assert [m["index"] for m in store.completed_shards(tmp_path)] == [0]
    store.remove_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_00000"]


def test_manifest_is_replaced_atomically_and_checked(tmp_path):
    assert store.read_manifest(tmp_path) is None
    store.write_json(tmp_path / store.MANIFEST, {"format": store.FORMAT, "count": 3})
    assert store.read_manifest(tmp_path) == {"format": store.FORMAT, "count": 3}
    assert [p.name for p in tmp_path.iterdir()] == [store.MANIFEST]
    (tmp_path / store.MANIFEST).write_text(json.dumps({"format": store.FORMAT + 1}))
    with pytest.raises(store.CorruptIndexError, match="format"):
        store.read_manifest(tmp_path)
    (tmp_path / store.MANIFEST).write_text("{not json")
    with pytest.raises(store.CorruptIndexError, match="not valid JSON"):
        store.read_manifest(tmp_path)


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    file = tmp_path / "f"
    file.write_bytes(bytes(range(256)) * 50_000)   # several 4 MiB blocks
    assert store.file_sha256(file) == hashlib.sha256(file.read_bytes()).hexdigest()
