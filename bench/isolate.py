"""Each measurement in a fresh process: a child forked from the driver (which imported torch but
never ran a torch op), or a `python bench/run.py --one ...` subprocess (`--isolate spawn`)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks import child_measure

#: The CLI a spawned measurement runs.
RUN_PY = Path(__file__).resolve().parent / "run.py"


def run_isolated(spec: dict, isolate: str, timeout: float) -> dict:
    """Runs child_measure(**spec) in a fresh process; {"error": ...} on failure or timeout."""
    if isolate == "spawn":
        cmd = [sys.executable, str(RUN_PY), "--one", spec["model"] or "-", str(spec["n"]), spec["task"],
               "--cap", str(spec["cap"]), "--reps", str(spec["reps"]), "--rep-budget", str(spec["rep_budget"]),
               "--threads", str(spec["threads"]), "--mm-gflops", str(spec["mm_gflops"])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out (> {timeout:.0f} s wall)"}
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, send JSON, exit without running the parent's cleanup
        os.close(r)
        code = 0
        try:
            res = child_measure(**spec)
        except BaseException as err:  # noqa: BLE001  reported to the driver
            res, code = {"error": f"{type(err).__name__}: {err}"[:500]}, 1
        try:
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(res).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"error": f"timed out (> {timeout:.0f} s wall)"}
            ready, _, _ = select.select([f], [], [], min(left, 5.0))
            if ready:
                data = os.read(f.fileno(), 1 << 16)
                if not data:
                    break
                chunks.append(data)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"error": f"child died (status {status})"}
    return json.loads(b"".join(chunks).decode())
