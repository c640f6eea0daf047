"""The methods that materialise G or a peer's N x N kernel, timed like ours: the naive loop,
torch.func vmap and the peers of `bench/peers.py`. Every G and every peer kernel is checked
against netsim on the first samples, and a result that differs is not reported as ok.

Each `*_task` returns `(run, project, rows_from)` for `tasks.child_measure`: run the method on
a bench, project its CPU seconds at N from a probe bench, and time it into result rows.
"""

from __future__ import annotations

import gc
from collections import defaultdict

import models as M
import peers as P
from timing import Clock, maxrss_mb, probe_seconds, result_row

CHECK_N = 32          # samples on which every G / peer kernel is compared with netsim
CHECK_RTOL_G = 1e-4   # max |G - G_netsim| / max |G_netsim|
CHECK_ATOL_K = 1e-3   # max |k^C - k^C_netsim| (k^C is unitless, |k^C| <= 1)
DENSE_EFF = 0.7       # assumed efficiency of the dense G G^T vs torch.mm in the projections
#: The three outputs of a method that builds G, and their names in results.json.
DENSE_TASKS = {"grads": "per_sample_grads", "soft": "soft_density", "sim": "similarity"}


def check_grads(b, G) -> dict:
    """Compares the first rows of a materialised `(N, d, p)` G with `netsim.per_sample_grads`
    (4 samples at a time: the check must not raise the measurement's peak memory).

    Tolerance: the larger of `CHECK_RTOL_G` and twice netsim's own float32 rounding error on
    those samples (against the same engine on a float64 copy of the model and inputs): two
    float32 results that each lie that far from the exact one can differ by twice it. Most
    models round at ~1e-6 of max |G|; the registration net's GroupNorm layers reach ~3e-4 on
    some samples, for every float32 method (the naive loop included)."""
    import copy

    import netsim
    m = min(b.n, CHECK_N)
    model64 = copy.deepcopy(b.model).double()
    diff = scale = rounding = 0.0
    for start in range(0, m, 4):
        stop = min(m, start + 4)
        x, t = b.inputs[start:stop], None if b.targets is None else b.targets[start:stop]
        ref = netsim.per_sample_grads(b.model, x, output_fn=b.output_fn, targets=t, method="jacobian")
        ref64 = netsim.per_sample_grads(model64, x.double() if x.is_floating_point() else x, output_fn=b.output_fn,
                                        targets=t, method="jacobian")
        diff = max(diff, (G[start:start + ref.shape[0]] - ref).abs().max().item())
        rounding = max(rounding, (ref.double() - ref64).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    scale = max(scale, 1e-30)
    err, tol = diff / scale, max(CHECK_RTOL_G, 2 * rounding / scale)
    return {"against": "netsim.per_sample_grads", "n": m, "max_rel_err": err,
            "netsim_float32_rel_err": rounding / scale, "tol": tol, "ok": err <= tol}


def check_similarity(b, kc) -> dict:
    """Compares the leading block of an N x N k^C with `netsim.similarity` on those samples."""
    m = min(b.n, CHECK_N)
    ref = M.ours_similarity(b.subset(m), "auto")
    err = (kc[:m, :m] - ref).abs().max().item()
    return {"against": "netsim.similarity", "n": m, "max_abs_err": err, "ok": err <= CHECK_ATOL_K}


def attach_check(row: dict, check: dict | None) -> dict:
    """Attaches the check; a result that differs from netsim's is not reported as ok."""
    if check is not None:
        row["check"] = check
        if not check["ok"] and row["status"] == "ok":
            err = check.get("max_rel_err", check.get("max_abs_err"))
            row["status"] = f"mismatch: differs from {check['against']} by {err:.2g}"
    return row


def dense_task(b, build, name: str, info: dict, rate: float):
    """A method that builds G `(N, d, p)` with `build(bench)` (naive loop, vmap or a peer), then
    the dense normalisation, soft density and G G^T of `models`: three rows (per_sample_grads,
    soft_density, similarity), G built once per repetition, the G G^T skipped alone when its
    projection passes the cap. `rate`: the torch.mm flop rate of the projections."""

    def run_small(bb):
        M.dense_soft_density(build(bb))
        M.dense_similarity(build(bb))

    def project(probe, n):
        tG = probe_seconds(build, probe) * n / probe.n
        p = sum(q.numel() for q in probe.model.parameters() if q.requires_grad)
        return {"grads": tG, "soft": tG * 1.02, "sim": tG + 2.0 * n * n * probe.d * p / (DENSE_EFF * rate)}

    def rows_from(run, projected, cap, reps, rep_budget, rss0):
        projected = projected or {}
        do_sim = projected.get("sim", 0) <= cap
        if projected.get("grads", 0) > cap:
            return [result_row(DENSE_TASKS[k], name, status="skipped", projected_s=projected[k], **info)
                    for k in ("grads", "soft", "sim")]
        times = defaultdict(list)
        walls = defaultdict(list)
        peaks = {}
        check = None
        for _ in range(max(1, reps)):
            gc.collect()
            with Clock() as cg:
                G = build(b)
            peaks.setdefault("grads", max(0.0, maxrss_mb() - rss0))
            if check is None:  # untimed: the first rows against netsim
                check = check_grads(b, G)
            with Clock() as cn:
                Q = M.dense_normalise(G)
            with Clock() as cs:
                ns = M.dense_soft(Q)
            del ns
            peaks.setdefault("soft", max(0.0, maxrss_mb() - rss0))
            times["grads"].append(cg.cpu)
            walls["grads"].append(cg.wall)
            times["soft"].append(cg.cpu + cn.cpu + cs.cpu)
            walls["soft"].append(cg.wall + cn.wall + cs.wall)
            if do_sim:
                with Clock() as ck:
                    K = M.dense_sim(Q)
                del K
                peaks.setdefault("sim", max(0.0, maxrss_mb() - rss0))
                times["sim"].append(cg.cpu + cn.cpu + ck.cpu)
                walls["sim"].append(cg.wall + cn.wall + ck.wall)
            del G, Q
            total = times["sim"] if do_sim else times["soft"]
            if sum(total) + total[-1] > rep_budget:
                break
        out = []
        for k in ("grads", "soft", "sim"):
            if times[k]:
                out.append(attach_check(result_row(DENSE_TASKS[k], name, times[k], walls[k], peak_extra_mb=peaks[k],
                                         projected_s=projected.get(k), **info,
                                         note="G built once per rep; soft/sim times include building G"), check))
            else:
                out.append(result_row(DENSE_TASKS[k], name, status="skipped", projected_s=projected.get(k), **info))
        return out
    return run_small, project, rows_from


def gram_peer_task(b, prepared, info: dict, rate: float):
    """A peer that returns the N x N kernel (nngeometry GramMatrix, Captum TracInCP): timed
    from the inputs to k^C (the peer's raw gram normalised by its diagonal blocks)."""
    run_peer = P.quiet(prepared.run)

    def run(bb):
        return M.correlation_from_gram(run_peer(bb))

    def project(probe, n):
        # batch passes scale with the batch size up to PEER_BATCH, then with their count
        seconds = probe_seconds(run, probe)
        unit = seconds * min(n, P.PEER_BATCH) / probe.n / P.gram_passes(prepared.method, probe.n, probe.d)
        p = sum(q.numel() for q in probe.model.parameters() if q.requires_grad)
        gemm = 2.0 * n * n * probe.d * (probe.d + 1) / 2 * p / (DENSE_EFF * rate)
        return unit * P.gram_passes(prepared.method, n, probe.d) + gemm

    def rows_from(_run, projected, cap, reps, rep_budget, rss0):
        if projected is not None and projected > cap:
            return [result_row("similarity", prepared.method, status="skipped", projected_s=projected, **info)]
        cpu, wall, check, peak = [], [], None, None
        for _ in range(max(1, reps)):
            gc.collect()
            with Clock() as c:
                kc = run(b)
            cpu.append(c.cpu)
            wall.append(c.wall)
            if check is None:
                peak = max(0.0, maxrss_mb() - rss0)
                check = check_similarity(b, kc)
            del kc
            if sum(cpu) + cpu[-1] > rep_budget:
                break
        return [attach_check(result_row("similarity", prepared.method, cpu, wall, peak_extra_mb=peak,
                              projected_s=projected, **info), check)]
    return run, project, rows_from
