"""netsim_paper.runtime: thread configuration and seeding."""

from __future__ import annotations

import os
import random
import subprocess
import sys

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
    assert default_workers() == runtime.available_cpus()
    monkeypatch.setenv("NETSIM_THREADS", str(2 * (os.cpu_count() or 1)))
    assert default_workers() == 1  # never below one worker


def test_default_workers_follow_the_cpu_affinity_not_the_machine(monkeypatch):
    monkeypatch.delenv("NETSIM_WORKERS", raising=False)
    monkeypatch.setenv("NETSIM_THREADS", "1")
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    assert runtime.available_cpus() == 3 and runtime.default_workers() == 3
    monkeypatch.setenv("NETSIM_THREADS", "2")
    assert runtime.default_workers() == 1
    monkeypatch.delattr(runtime.os, "sched_getaffinity")  # e.g. macOS, Windows
    assert runtime.available_cpus() == 64


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_available_cpus_is_this_process_affinity():
    assert runtime.available_cpus() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_default_workers_in_a_process_pinned_to_one_cpu():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from netsim_paper.runtime import default_workers; print(default_workers())")
    env = {k: v for k, v in os.environ.items() if k not in ("NETSIM_WORKERS", "NETSIM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
