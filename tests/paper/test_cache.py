"""The on-disk cache: plain payloads only, verified loads that run no code, corrupt entries
reported and rebuilt, atomic writes, temporary files of dead writers removed."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

from netsim_paper import cache
from netsim_paper.cache import CorruptCacheWarning, cached, save_atomic


def _payload():
    return {"weights": OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.zeros(2)),
            "losses": [0.5, 0.25], "shape": (2, 3), "name": "net", "done": True, "note": None, 3: -1}


def _counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_computes_once_then_loads_the_same_plain_data(tmp_path):
    compute, calls = _counting(_payload())
    first = cached(tmp_path / "a.pt", compute)
    second = cached(tmp_path / "a.pt", compute)
    assert len(calls) == 1
    _assert_same(second, first)
    cached(tmp_path / "a.pt", compute, refresh=True)
    assert len(calls) == 2


def test_a_failed_computation_leaves_no_file(tmp_path):
    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cached(tmp_path / "b.pt", boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, where, hint", [
    ({"chain": torch.nn.Linear(2, 1)}, r"payload\['chain'\]", "nn.Module.*state_dict"),
    ({"runs": [{"x": np.zeros(3)}]}, r"payload\['runs'\]\[0\]\['x'\]", "numpy.ndarray.*torch.from_numpy"),
    ([1.0, np.float64(2.0)], r"payload\[1\]", r"numpy.float64.*\.item\(\)"),
    ({"f": object()}, r"payload\['f'\]", "builtins.object"),
    ({(1, 2): torch.zeros(1)}, "key of type tuple", "keys must be"),
])
def test_non_plain_payloads_are_refused_at_save_time(tmp_path, bad, where, hint):
    compute, calls = _counting(bad)
    with pytest.raises(TypeError, match=f"{where}.*{hint}"):
        cached(tmp_path / "m.pt", compute)
    assert calls == [1] and list(tmp_path.iterdir()) == []  # nothing written, no temporary file left


class _Exploit:
    """Unpickling this writes a marker file: the code a planted cache file would run."""

    marker = ""

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _malicious_pickle(tmp_path):
    exploit = _Exploit()
    exploit.marker = str(tmp_path / "pwned")
    buffer = io.BytesIO()
    torch.save({"x": exploit}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("with_valid_header", [False, True])
def test_a_planted_file_runs_no_code_and_is_rebuilt(tmp_path, with_valid_header):
    data = _malicious_pickle(tmp_path)
    if with_valid_header:  # even a correct checksum does not make a payload safe to unpickle
        data = b"netsim-cache v1 sha256=%s bytes=%d\n" % (hashlib.sha256(data).hexdigest().encode(), len(data)) + data
    path = tmp_path / "planted.pt"
    path.write_bytes(data)
    compute, calls = _counting({"x": torch.ones(2)})
    with pytest.warns(CorruptCacheWarning, match=str(path)):
        result = cached(path, compute)
    assert not (tmp_path / "pwned").exists()
    assert calls == [1] and torch.equal(result["x"], torch.ones(2))
    assert torch.equal(cache.load(path)["x"], torch.ones(2))  # the rebuilt entry verifies


def _corrupt_flip(data: bytes) -> bytes:
    data = bytearray(data)
    for i in (len(data) // 2, len(data) - 40):  # two bytes of the payload, past the header
        data[i] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("damage, reason", [
    (_corrupt_flip, "sha256"),
    (lambda data: data[: len(data) // 2], "truncated"),
    (lambda data: data[:10], "header"),
    (lambda data: b"", "header"),
])
def test_a_damaged_entry_is_reported_with_its_path_and_rebuilt(tmp_path, damage, reason):
    path = tmp_path / "entry.pt"
    value = {"w": torch.linspace(0, 1, 1000)}
    save_atomic(value, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(cache.CorruptCacheEntry, match=reason):
        cache.load(path)
    compute, calls = _counting(value)
    with pytest.warns(CorruptCacheWarning, match=f"{path}.*{reason}"):
        result = cached(path, compute)
    assert calls == [1] and torch.equal(result["w"], value["w"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(cached(path, compute)["w"], value["w"])  # rebuilt: loads cleanly now
    assert calls == [1]


def test_an_entry_of_the_previous_format_is_rebuilt(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, path)  # a bare torch.save file: no header, no checksum
    compute, calls = _counting({"w": torch.zeros(3)})
    with pytest.warns(CorruptCacheWarning, match="header"):
        assert torch.equal(cached(path, compute)["w"], torch.zeros(3))
    assert calls == [1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = tmp_path / f".entry.pt.pid{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".entry.pt.pid{os.getpid()}.xyz789.tmp"  # a writer still at work
    unrelated = tmp_path / "notes.tmp"
    for file in (dead, live, unrelated):
        file.write_bytes(b"partial")
    cached(tmp_path / "other.pt", lambda: {"x": torch.zeros(1)})
    assert not dead.exists()
    assert live.exists() and unrelated.exists()


def test_writes_go_through_a_temporary_file_named_after_the_writer(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", spy)
    save_atomic({"x": torch.zeros(1)}, tmp_path / "e.pt")
    assert len(seen) == 1 and cache._TEMP.match(seen[0]) and f".pid{os.getpid()}." in seen[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.pt"]
