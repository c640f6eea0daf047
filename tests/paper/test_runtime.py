"""netsim_paper.runtime: thread configuration and seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from netsim_paper import runtime


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_configure_threads_sources(monkeypatch):
    monkeypatch.delenv("NETSIM_THREADS", raising=False)
    assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("NETSIM_THREADS", "2")
    assert runtime.configure_threads() == 2 and torch.get_num_threads() == 2
    assert runtime.configure_threads(1) == 1  # the argument wins over the environment
    assert runtime.configure_threads(1) == 1  # idempotent
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("env", ["0", "-1", "two", "1.5"])
def test_configure_threads_rejects_bad_env(monkeypatch, env):
    monkeypatch.setenv("NETSIM_THREADS", env)
    with pytest.raises(ValueError, match="NETSIM_THREADS"):
        runtime.configure_threads()


@pytest.mark.parametrize("n", [0, -3, 1.5, True])
def test_configure_threads_rejects_bad_argument(n):
    with pytest.raises(ValueError):
        runtime.configure_threads(n)


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    runtime.seed_everything(7)
    first = draw()
    runtime.seed_everything(7)
    assert draw() == first
    runtime.seed_everything(8)
    assert draw() != first


def test_build_seeded_depends_on_the_seed_only_and_leaves_the_global_rng_alone():
    import torch

    from netsim_paper.runtime import build_seeded

    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a = build_seeded(lambda: torch.nn.Linear(3, 2), 5)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_seeded(lambda: torch.nn.Linear(3, 2), 5)
    c = build_seeded(lambda: torch.nn.Linear(3, 2), 6)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


def test_default_workers_reads_the_environment(monkeypatch):
    from netsim_paper.runtime import default_workers
    monkeypatch.setenv("NETSIM_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("NETSIM_WORKERS", "zero")
    with pytest.raises(ValueError, match="NETSIM_WORKERS"):
        default_workers()
    monkeypatch.delenv("NETSIM_WORKERS")
    monkeypatch.setenv("NETSIM_THREADS", "1")
    assert default_workers() == max(1, os.cpu_count() or 1)
    monkeypatch.setenv("NETSIM_THREADS", str(2 * (os.cpu_count() or 1)))
    assert default_workers() == 1  # never below one worker
