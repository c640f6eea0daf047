"""The on-disk cache: computes once, reloads, never leaves a partial file."""

import pytest
import torch

from netsim_paper.cache import cached


def test_computes_once_then_loads(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"model": torch.nn.Linear(2, 1), "x": torch.arange(3)}

    first = cached(tmp_path / "a.pt", compute)
    second = cached(tmp_path / "a.pt", compute)
    assert len(calls) == 1
    torch.testing.assert_close(second["model"].weight, first["model"].weight)
    cached(tmp_path / "a.pt", compute, refresh=True)
    assert len(calls) == 2


def test_a_failed_computation_leaves_no_file(tmp_path):
    def boom():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cached(tmp_path / "b.pt", boom)
    assert list(tmp_path.iterdir()) == []
