"""The driver's loop: every (model, N, task) in its own process, the skips that save the time
budget, then the extras (threads, soft-density profile, per-layer gram), into one results dict.

A configuration whose G (N d p float32) exceeds the G limit is "infeasible" for the methods
that materialise G; a (model, task) skipped or timed out at one N is not spawned again at a
larger N (its projection is scaled instead); a peer that cannot handle a model is not retried.
"""

from __future__ import annotations

import time

import models as M
import peers as P
from isolate import run_isolated
from records import method_label, row_cells
from tasks import TASK_NAMES


class Sweep:
    """Spawns the measurements of one run and appends their rows to `res` (see `run.main`).

    Args:
        res: the results dict being built (`results`, `models`, `timeline`, `gemm` are used).
        budget: wall-clock seconds of the whole run, counted from `t_start`.
        cap, reps, rep_budget: defaults of every measurement (see `tasks.child_measure`).
        isolate: "fork" or "spawn" (`isolate.run_isolated`).
        g_limit_gb: G size above which the methods that materialise G are infeasible.
        reserve: wall seconds of the budget kept for the extras.
    """

    def __init__(self, res: dict, *, t_start: float, budget: float, cap: float, reps: int, rep_budget: float,
                 isolate: str, g_limit_gb: float, reserve: float):
        self.res, self.t_start, self.budget = res, t_start, budget
        self.cap, self.reps, self.rep_budget = cap, reps, rep_budget
        self.isolate, self.g_limit_gb, self.reserve = isolate, g_limit_gb, reserve
        self.skipped_at: dict[tuple[str, str], tuple[int, float | None]] = {}
        self.failed_at: dict[tuple[str, str], tuple[int, str]] = {}  # a peer that cannot handle a model

    def spend_ok(self, keep: float = 0.0) -> bool:
        """Whether the budget, less `keep` seconds, is not yet spent."""
        return time.perf_counter() - self.t_start < self.budget - keep

    def spawn(self, model, n, task, *, threads=1, cap=None, reps=None) -> dict:
        """One measurement in a fresh process (its wall time goes to the timeline)."""
        cap = self.cap if cap is None else cap
        reps = self.reps if reps is None else reps
        spec = dict(model=model, n=n, task=task, cap=cap, reps=reps, rep_budget=self.rep_budget, threads=threads,
                    mm_gflops=self.res.get("gemm", {}).get("gflops", 30.0))
        left = self.budget - (time.perf_counter() - self.t_start)
        timeout = max(60.0, min(3 * cap * max(1, reps) + 120, left + 120))
        t0 = time.perf_counter()
        out = run_isolated(spec, self.isolate, timeout)
        self.res["timeline"].append({"model": model, "n": n, "task": task, "threads": threads,
                                     "wall_s": round(time.perf_counter() - t0, 2)})
        return out

    # ------------------------------------------------------------------ the models

    def models(self, names: list[str], sizes: tuple[int, ...], tasks: list[str]) -> None:
        """Every model at every N: the epoch first, then each task against it."""
        res = self.res
        for model in names:
            available = M.MODELS[model] is not None
            res["models"][model] = {"available": available, "description": M.DESCRIPTIONS[model]}
            if not available:
                res["results"].append({"model": model, "n": None, "task": "—", "method": "—",
                                       "status": "not yet available"})
                continue
            for n in sizes:
                if not self.spend_ok(self.reserve):
                    res["results"].append({"model": model, "n": n, "task": "all", "method": "—",
                                           "status": "skipped", "reason": "time budget spent"})
                    continue
                ep = self.spawn(model, n, "epoch")
                if "error" in ep:
                    res["results"].append({"model": model, "n": n, "task": "epoch", "method": "epoch",
                                           "status": f"error: {ep['error']}"})
                    continue
                ep_row = ep["rows"][0]
                ep_row.update(model=model, n=n, x_epoch=1.0, epoch_s=ep_row["seconds"])
                res["results"].append(ep_row)
                t_epoch = ep_row["seconds"]
                print(f"{model} N={n}: epoch {t_epoch:.3g} s", flush=True)
                p = ep["params"]  # the driver never builds a model: no torch op before a fork
                res["models"][model]["params"] = p
                d = ep.get("d", 1)
                res["models"][model]["d"] = d
                for task in tasks:
                    self._task(model, n, task, t_epoch, g_bytes=n * d * p * 4)

    def _task(self, model: str, n: int, task: str, t_epoch: float, g_bytes: int) -> None:
        res = self.res
        kind, _, method = task.partition(":")
        gram_peer = kind == "peer" and P.PEERS[method].kind == "gram"
        builds_g = task in ("naive", "vmap") or (kind == "peer" and not gram_peer)
        # Captum keeps the test Jacobians of all N samples: as much memory as G
        materialises = kind == "grads" or builds_g or method == "captum"
        out_tasks = [TASK_NAMES[k] for k in ("grads", "soft", "sim")] if builds_g \
            else ["similarity"] if gram_peer else [TASK_NAMES[kind]]
        meth = method or task

        def add_all(**row):
            for t in out_tasks:
                res["results"].append({"model": model, "n": n, "task": t, "method": meth, **row})

        if (model, task) in self.failed_at:  # the same failure at every N: not spawned again
            n0, err = self.failed_at[(model, task)]
            add_all(status=f"error: {err}", reason=f"as at N={n0}")
            return
        if materialises and g_bytes > self.g_limit_gb * 1e9:
            add_all(status="infeasible", needs_gb=g_bytes / 1e9)
            return
        prev = self.skipped_at.get((model, task))
        if prev is not None or not self.spend_ok(self.reserve):
            for t in out_tasks:
                row = {"model": model, "n": n, "task": t, "method": meth, "status": "skipped"}
                if prev is None:
                    row["reason"] = "time budget spent"
                else:
                    n0, proj0 = prev
                    e = 2 if t == "similarity" else 1
                    row["projected_s"] = None if proj0 is None else proj0 * (n / n0) ** e
                    if proj0 is None:
                        row["reason"] = f"skipped at N={n0}"
                res["results"].append(row)
            return
        cap_here = self.cap
        if model == "cnn1m" and task == "sim:layerwise" and n == 4096:
            cap_here = max(self.cap, 15.0 * t_epoch)  # the goal's configuration: measure it if <= 15x epoch
        out = self.spawn(model, n, task, cap=cap_here)
        if "error" in out:
            add_all(status=f"error: {out['error']}")
            print(f"  {task}: ERROR {out['error']}", flush=True)
            if out["error"].startswith("timed out"):
                self.skipped_at[(model, task)] = (n, None)
            elif out["error"].startswith("PeerUnsupported"):
                self.failed_at[(model, task)] = (n, out["error"])
            return
        for row in out["rows"]:
            row.update(model=model, n=n)
            if row["status"] == "ok":
                row["x_epoch"] = row["seconds"] / t_epoch
                row["epoch_s"] = t_epoch  # the epoch of this run: ratios survive a --merge
            res["results"].append(row)
            s, x, mb, st = row_cells(row)
            print(f"  {row['task']:17s} {method_label(row):24s} {s:>8s} s {x:>7s}x {mb:>6s} MB  {st}", flush=True)
        if builds_g:
            if all(r["status"] == "skipped" for r in out["rows"]):
                self.skipped_at[(model, task)] = (n, out["rows"][0].get("projected_s"))
            # only the similarity skipped: the next N re-probes
        elif out["rows"][0]["status"] == "skipped":
            self.skipped_at[(model, task)] = (n, out["rows"][0].get("projected_s"))

    # ------------------------------------------------------------------ the extras

    def extras(self, names: list[str], sizes: tuple[int, ...], quick: bool) -> None:
        """1 vs 2 threads (MLP, MNIST CNN), the soft-density profiles and the MLP's per-layer gram."""
        res = self.res
        avail = [m for m in names if M.MODELS[m] is not None]
        thread_n = min(4096 if not quick else 256, max(sizes))
        for model in [m for m in ("mlp", "mnist_cnn") if m in avail]:
            for task in ("epoch", "soft:layerwise"):
                for th in (1, 2):
                    if not self.spend_ok():
                        break
                    out = self.spawn(model, thread_n, task, threads=th, cap=1e9)
                    if "error" in out:
                        res["threads"].append({"model": model, "n": thread_n, "task": task, "threads": th,
                                               "error": out["error"]})
                        continue
                    r = out["rows"][0]
                    res["threads"].append({"model": model, "n": thread_n, "task": TASK_NAMES.get(task[:4], "epoch")
                                           if task != "epoch" else "epoch", "threads": th,
                                           "cpu_s": r["seconds"], "wall_s": r["wall_s"], "reps": r["reps"],
                                           "loadavg": out["loadavg"]})
        res["threads_summary"] = threads_summary(res["threads"])

        res["soft_density_profile"] = {}
        prof_n = min(4096 if not quick else 1024, max(sizes))
        for model in [m for m in ("mnist_cnn", "cnn1m", "mlp", "transformer", "resnet") if m in avail]:
            if self.spend_ok():
                res["soft_density_profile"][model] = self.spawn(model, prof_n, "profile:soft", cap=1e9)

        mlp_sims = [r for r in res["results"] if r["model"] == "mlp" and r["task"] == "similarity"
                    and r["method"] == "layerwise" and r["status"] == "ok"]
        if mlp_sims and self.spend_ok():
            gl_n = min(4096, max(r["n"] for r in mlp_sims))
            res["gram_layers_mlp"] = self.spawn("mlp", gl_n, "gram_layers", cap=1e9)


def threads_summary(threads: list[dict]) -> dict:
    """Wall time with 1 and 2 torch threads of each (model, task) measured with both."""
    summary = {}
    for model in {t["model"] for t in threads}:
        for task in ("epoch", "soft_density"):
            ts = {t["threads"]: t for t in threads if t["model"] == model and t["task"] == task and "wall_s" in t}
            if 1 in ts and 2 in ts:
                faster = 1 if ts[1]["wall_s"] <= ts[2]["wall_s"] else 2
                summary[f"{model}/{task}"] = {"wall_1": ts[1]["wall_s"], "wall_2": ts[2]["wall_s"],
                                              "speedup_2_threads": ts[1]["wall_s"] / ts[2]["wall_s"],
                                              "faster_threads": faster}
    return summary


def gemm_efficiency(res: dict) -> dict | None:
    """The layer-wise gram's GFLOP/s in the MLP similarity at the largest N, against torch.mm."""
    mlp_sims = [r for r in res["results"] if r["model"] == "mlp" and r["task"] == "similarity"
                and r["method"] == "layerwise" and r["status"] == "ok" and r.get("gram_gflops")]
    if not mlp_sims or "gflops" not in res["gemm"]:
        return None
    r = max(mlp_sims, key=lambda r: r["n"])
    return {"model": "mlp", "n": r["n"], "gram_gflops": r["gram_gflops"], "mm_gflops": res["gemm"]["gflops"],
            "efficiency": r["gram_gflops"] / res["gemm"]["gflops"],
            "gram_share_of_similarity": r["gram_seconds"] / r["seconds"],
            "flop_formula": "per Linear(in, out) layer and pair of samples: 2 (in + d out) "
                            "(X X^T and Delta Delta^T GEMMs); dense layers 2 d p_l; summed "
                            "over the gram calls similarity executes (diagonal blocks in full)"}
