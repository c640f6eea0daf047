"""Timing and memory primitives of one measurement: CPU and wall clocks, repetitions within a
budget, resident memory, and the result row every measurement reports."""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time

FAST_RUN, FAST_REPS = 0.1, 7  # runs under 0.1 s CPU are repeated 7 times
WARMUP = 8                    # samples of the untimed warm-up run of every method


def rss_mb() -> float:
    """Current resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def maxrss_mb() -> float:
    """Peak resident set size of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Clock:
    """CPU (process) and wall time of one call."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def __enter__(self):
        self._c, self._w = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.cpu, self.wall = time.process_time() - self._c, time.perf_counter() - self._w


def repeat(fn, reps: int, budget: float) -> tuple[list[float], list[float]]:
    """Runs fn up to `reps` times; a further repetition only if the total stays within budget."""
    cpu, wall = [], []
    while len(cpu) < max(1, reps):
        if not cpu or cpu[-1] >= FAST_RUN:  # gc.collect costs ~30 ms: not between millisecond runs
            gc.collect()
        with Clock() as c:
            out = fn()
        del out
        cpu.append(c.cpu)
        wall.append(c.wall)
        if len(cpu) == 1 and c.cpu < FAST_RUN:
            reps = max(reps, FAST_REPS)  # millisecond runs: more repetitions for a stable median
        if sum(cpu) + c.cpu > budget:
            break
    return cpu, wall


def result_row(task: str, method: str, cpu=None, wall=None, **extra) -> dict:
    """A results.json row: median CPU / wall seconds of the repetitions, or a status
    ("skipped" unless `status=` is given) when nothing was timed."""
    row = {"task": task, "method": method, "status": "ok" if cpu else extra.pop("status", "skipped")}
    if cpu:
        row.update(seconds=statistics.median(cpu), wall_s=statistics.median(wall), reps=len(cpu), times=cpu)
    row.update(extra)
    return row


def probe_seconds(fn, probe) -> float:
    """CPU seconds of one `fn(probe)` after a garbage collection (the probes of the projections)."""
    gc.collect()
    with Clock() as c:
        fn(probe)
    return c.cpu
