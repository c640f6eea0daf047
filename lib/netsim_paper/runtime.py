"""Process-wide run settings: torch thread count and seeds.

Notebooks and benchmarks call both at the top::

    >>> from netsim_paper import runtime
    >>> runtime.configure_threads()   # 1 unless $NETSIM_THREADS or an argument says otherwise
    1
    >>> runtime.seed_everything(0)
"""

from __future__ import annotations

import os
import random


def _thread_count(n: int | None = None) -> int:
    """The count `configure_threads` sets: `n`, else `$NETSIM_THREADS`, else 1 (validated)."""
    if n is not None:
        count, source = n, "argument"
    else:
        env = os.environ.get("NETSIM_THREADS", "").strip()
        count, source = (int(env) if env.isdigit() else env, "NETSIM_THREADS") if env else (1, "default")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"thread count from {source} must be a positive integer, got {count!r}")
    return count


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    The count is `n` if given, else `$NETSIM_THREADS`, else 1. The default is 1 because on
    the shared 2-core machines this project runs on, oversubscribed torch threads were
    measured 10-160x slower than a single thread. The performance work re-measures this;
    set NETSIM_THREADS to override without code changes.

    Idempotent: calling it again with the same count changes nothing. Only the intra-op
    pool is set: `torch.set_num_interop_threads` may be called once per process, before any
    parallel work, so it is left to the caller.

    Raises:
        ValueError: a count (argument or environment) that is not a positive integer.
    """
    count = _thread_count(n)
    import torch  # imported late: validating the count should not cost a torch import

    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def available_cpus() -> int:
    """The CPUs this process may run on: its CPU affinity where the OS reports one (a container
    or `taskset` can allow fewer than the machine has), else `os.cpu_count()`, at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """How many worker processes (of `configure_threads`'s thread count each, 1 by default) to
    run side by side: ``$NETSIM_WORKERS``, else `available_cpus` divided by that thread count,
    at least 1.

    Raises:
        ValueError: a ``$NETSIM_WORKERS`` or ``$NETSIM_THREADS`` that is not a positive integer.
    """
    env = os.environ.get("NETSIM_WORKERS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"NETSIM_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    return max(1, available_cpus() // _thread_count())


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy's global generator and torch (CPU and all devices).

    Covers the global generators only: code that builds its own `torch.Generator` or
    `numpy.random.default_rng(seed)` seeds those itself. `PYTHONHASHSEED` cannot be set
    from inside a running process and is not touched.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA generators when present


def build_seeded(build, seed: int | None):
    """`build()` with PyTorch's default initialisation drawn under `torch.manual_seed(seed)` in a
    forked RNG: the weights depend on the seed alone and the global RNG is left untouched.
    `seed=None` draws from the global RNG."""
    import torch

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()
