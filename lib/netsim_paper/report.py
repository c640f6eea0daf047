"""Metrics JSON next to each figure, and the README results table generated from them.

Each notebook ends with::

    report.write_metrics("02_sinusoid_density", {
        "spearman_soft_vs_hard": rho,
        "readme_rows": [{"quantity": "Spearman(N_S, N_tau)", "ours": rho, "paper": "≈0.9"}],
    }, profile=profile, seeds=[seed])

and `python -m netsim_paper.report update-readme` (run by `run_all.sh`) rebuilds, in README.md:

- the headline results between `<!-- results:start -->` and `<!-- results:end -->`: a few rows
  of every `figures/[0-9][0-9]_*.json` (`HEADLINES`), each linked to its executed notebook in
  `figures/notebooks/`; every row of every notebook goes to `figures/RESULTS.md`;
- the paper-regime line between `<!-- regime:start -->` and `<!-- regime:end -->`, from
  `figures/01_alignment_cdf.json`;
- the performance summary (goals, one row per bench model) between `<!-- performance:start -->`
  and `<!-- performance:end -->`, from `bench/results.json`, and the full table in
  `bench/RESULTS.md`;
- the SimilarityIndex goals between `<!-- index:start -->` and `<!-- index:end -->`, from
  `bench/index_results.json` and `bench/hf_index_results.json`; its scale table between
  `<!-- index-scale:start -->` and `<!-- index-scale:end -->`, from `bench/index_scale_results.json`.

The numbers in the README are therefore never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import check_profile, repo_root
from .plotting import figures_dir

START, END = "<!-- results:start -->", "<!-- results:end -->"
#: Optional README section filled from bench/results.json (`python bench/run.py`).
PERF_START, PERF_END = "<!-- performance:start -->", "<!-- performance:end -->"
INDEX_START, INDEX_END = "<!-- index:start -->", "<!-- index:end -->"
SCALE_START, SCALE_END = "<!-- index-scale:start -->", "<!-- index-scale:end -->"
#: Optional README line filled from the x1.5-noise control of figures/01_alignment_cdf.json.
REGIME_START, REGIME_END = "<!-- regime:start -->", "<!-- regime:end -->"
#: Where `./run_all.sh` publishes the executed notebooks, relative to the README.
NOTEBOOKS_LINK = "figures/notebooks"
#: Keys that write_metrics adds itself; metrics may not use them.
RESERVED = ("profile", "seeds", "package_versions", "numeric_setting", "generated_at")
NO_RESULTS = "No results yet: run ./run_all.sh"
#: The README's rows of each notebook, by the start of their quantity (the README stays short;
#: `figures/RESULTS.md` has them all). A notebook not named here shows its first row.
HEADLINES: dict[str, tuple[str, ...]] = {
    "00_kernel_tour": ("mean |target gap|",),
    "01_alignment_cdf": ("median error (px): noise → round 1 → round 2", "drop factor",
                         "held-out tiles", "shifted-labels control", "inflated-buildings control"),
    "02_sinusoid_density": ("log-log slope of N_S vs f", "log-log slope of N_tau=0.9 vs f"),
    "03_mnist_speedup": ("steps to 50% accuracy", "paired difference to baseline at step 30, + paper criterion",
                         "paired difference to baseline at step 30, + (+cos)"),
    "04_neighbor_patches": ("neighbour skill, building density", "neighbour skill, label noise"),
    "05_similarity_histograms": ("query's mean k^C to all patches", "predicted denoising factor"),
    "06_data_audit": ("flipped-label AUROC [95%] / precision@2500, k^C neighbours",
                      "flipped-label AUROC [95%] / precision@2500, training loss",
                      "misclassified-test-image AUROC, low N_S", "misclassified-test-image AUROC, low max-softmax"),
    "07_huggingface": ("ViT on MNIST: test accuracy", "GPT-2: nearest training window from the query's document"),
}


# --------------------------------------------------------------------------- metrics JSON

def _to_json(obj: Any, path: str) -> Any:
    """Plain JSON values from `obj`, converting numpy / torch scalars and arrays.

    A recursive walk rather than only `json.dump(default=...)`: `default` is never called for
    Python floats, so it cannot catch a NaN, and a walk can name where the bad value sits.

    Raises:
        ValueError: a NaN or infinite value, naming its key path (e.g. `metrics["a"][3]`).
        TypeError: a value with no JSON form.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite value {obj!r} at {path}: refusing to write NaN/inf")
        return float(obj)  # np.float64 is a float subclass: store the plain value
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"metric keys must be strings, got {key!r} at {path}")
            out[key] = _to_json(value, f"{path}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_json(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    # torch tensors (duck-typed, so that importing this module never imports torch)
    if type(obj).__module__.startswith("torch") and hasattr(obj, "detach"):
        return _to_json(obj.detach().cpu().tolist(), path)
    # numpy arrays and scalars (np.float32, np.int64, np.bool_ ...) all have .tolist()
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return _to_json(obj.tolist(), path)
    raise TypeError(f"cannot write {type(obj).__name__} at {path} as JSON: {obj!r}")


def _json_default(obj: Any) -> Any:
    # Everything was converted by _to_json; reaching here is a bug in it.
    raise TypeError(f"unconverted value of type {type(obj).__name__}: {obj!r}")


def package_versions() -> dict[str, str]:
    """Versions of python and the packages the numbers depend on (without importing torch)."""
    versions = {"python": sys.version.split()[0]}
    for name in ("torch", "numpy", "matplotlib", "netsim"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def numeric_setting() -> dict[str, Any]:
    """What, beside the code and versions, fixes the low bits of trained models: the CPU's vector
    instruction set as torch uses it (e.g. "AVX2") and torch's thread count. Same code, same seeds
    and a different setting train to different registration models (traced on 2026-11-30)."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "machine": platform.machine()}


def write_metrics(stem: str, metrics: Mapping[str, Any], *, profile: str,
                  seeds: int | list[int] | tuple[int, ...]) -> Path:
    """Write `<figures_dir>/<stem>.json`: the metrics plus provenance.

    Args:
        stem: the notebook stem, e.g. "02_sinusoid_density" (no directory, no extension).
        metrics: headline numbers; nested dicts/lists, numpy and torch values are fine.
            Optional key `readme_rows`: list of {"quantity", "ours", "paper"} dicts, the
            rows of this notebook's section in the README results table.
        profile: "smoke" or "paper"; also picks the directory (see `netsim_paper.plotting`).
        seeds: the seed or seeds the numbers come from.

    Returns:
        The path written.

    Raises:
        ValueError: a NaN/inf anywhere (the message names its key path), a reserved key
            ("profile", "seeds", "package_versions", "numeric_setting", "generated_at"), or a bad
            stem. Nothing
            is written then.
    """
    if not stem or Path(stem).name != stem or stem.endswith(".json"):
        raise ValueError(f"stem must be a bare file stem like '02_sinusoid_density', got {stem!r}")
    check_profile(profile)
    clash = [k for k in RESERVED if k in metrics]
    if clash:
        raise ValueError(f"metrics use reserved keys {clash}; write_metrics adds them itself")
    seed_list = [seeds] if isinstance(seeds, int) else list(seeds)
    payload = dict(_to_json(dict(metrics), "metrics"))
    payload.update(
        profile=profile,
        seeds=_to_json(seed_list, "seeds"),
        package_versions=package_versions(),
        numeric_setting=numeric_setting(),
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    text = json.dumps(payload, indent=2, allow_nan=False, default=_json_default) + "\n"
    path = figures_dir(profile) / f"{stem}.json"
    _atomic_write_text(path, text)
    return path


# --------------------------------------------------------------------------- README table

def _cell(value: Any) -> str:
    """One table cell: 4 significant digits for floats, pipes escaped."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rows(data: Mapping[str, Any]) -> list[tuple[Any, Any, Any]]:
    """(quantity, ours, paper) of a notebook's metrics: its `readme_rows`, or else its numeric
    scalars (paper unknown)."""
    rows = data.get("readme_rows")
    if rows is not None:
        return [(row.get("quantity"), row.get("ours"), row.get("paper")) for row in rows]
    return [(k, v, None) for k, v in data.items()
            if k not in RESERVED and isinstance(v, (int, float)) and not isinstance(v, bool)]


def _provenance(stem: str, data: Mapping[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in data.get("seeds", [])) or "?"
    versions = data.get("package_versions", {})
    return (f"profile `{data.get('profile', '?')}`, seeds {seeds}, torch {versions.get('torch', '?')}, "
            f"generated {data.get('generated_at', '?')} — from `figures/{stem}.json`")


def _section(stem: str, data: Mapping[str, Any], notebooks: str) -> list[str]:
    title = data.get("title")
    lines = [f"### [{stem}]({notebooks}/{stem}.ipynb)" + (f" — {title}" if isinstance(title, str) else "")]
    lines += ["| Quantity | Ours | Paper |", "| --- | --- | --- |"]
    lines += [f"| {_cell(q)} | {_cell(o)} | {_cell(p)} |" for q, o, p in _rows(data)]
    return lines + ["", f"<sub>{_provenance(stem, data)}</sub>", ""]


def _metrics(figures: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(f.stem, json.loads(f.read_text(encoding="utf-8")))
            for f in sorted(Path(figures).glob("[0-9][0-9]_*.json"))]


def _headline_rows(stem: str, data: Mapping[str, Any]) -> list[tuple[Any, Any, Any]]:
    rows = _rows(data)
    picked = []
    for prefix in HEADLINES.get(stem, ()):
        match = [r for r in rows if str(r[0]).startswith(prefix)]
        if len(match) != 1:
            raise ValueError(f"figures/{stem}.json has {len(match)} rows starting {prefix!r} "
                             f"(report.HEADLINES expects one)")
        picked += match
    return picked or rows[:1]


def results_markdown(figures: Path) -> str:
    """The README's results: one table of each notebook's headline rows (`HEADLINES`), linked to
    its executed notebook, from every `figures/[0-9][0-9]_*.json`."""
    metrics = _metrics(figures)
    if not metrics:
        return NO_RESULTS + "\n"
    lines = ["| Notebook | Quantity | Ours | Paper |", "| --- | --- | --- | --- |"]
    for stem, data in metrics:
        link = f"[{stem[:2]}]({NOTEBOOKS_LINK}/{stem}.ipynb)"
        for q, o, p in _headline_rows(stem, data):
            lines.append(f"| {link} | {_cell(q)} | {_cell(o)} | {_cell(p)} |")
    dates = sorted({str(d.get("generated_at", "?"))[:10] for _, d in metrics})
    profiles = sorted({str(d.get("profile", "?")) for _, d in metrics})
    lines += ["", f"<sub>generated from `figures/*.json` (profile {', '.join(profiles)}; {', '.join(dates)}); "
                  f"every row, seeds and versions: [`figures/RESULTS.md`](figures/RESULTS.md)</sub>"]
    return "\n".join(lines) + "\n"


def figures_page_markdown(figures: Path) -> str:
    """`figures/RESULTS.md`: every row of every notebook's metrics, with where it came from."""
    body = [line for stem, data in _metrics(figures) for line in _section(stem, data, "notebooks")]
    return ("# Results, notebook by notebook\n\n"
            "Generated from the `*.json` beside this page by `python -m netsim_paper.report update-readme` "
            "(run by `./run_all.sh`); never edited by hand. Each title links to the executed notebook.\n\n"
            + "\n".join(body).rstrip("\n") + "\n")


def paper_regime_markdown(figures: Path) -> str | None:
    """One line on the x1.5-noise control of Figs. 1-2 (the paper's noise regime): its median
    error before and after each round, on the training and the held-out tiles.

    Returns:
        The line (ending in a newline), or None when `figures/01_alignment_cdf.json` or its
        `control` entry is missing.
    """
    path = Path(figures) / "01_alignment_cdf.json"
    if not path.is_file():
        return None
    control = json.loads(path.read_text(encoding="utf-8")).get("control") or {}
    rounds = control.get("rounds") or []
    if control.get("noise_median_px") is None or not rounds:
        return None
    train = " → ".join(f"{v:.2f}" for v in [control["noise_median_px"], *(r["median_px"] for r in rounds)])
    line = (f"noise ×{_cell(control.get('noise_factor'))}, median error (px) of the noisy labels → "
            f"round{'s 1–' if len(rounds) > 1 else ' '}{len(rounds)}: {train}")
    heldout = rounds[-1].get("heldout_median_px")
    if control.get("heldout_noise_median_px") is not None and heldout is not None:
        line += f" (held-out tiles: {control['heldout_noise_median_px']:.2f} → {heldout:.2f} px)"
    return line + " — from `figures/01_alignment_cdf.json`\n"


# --------------------------------------------------------------------------- performance

_METHODS = {"epoch": "epoch (reference)", "layerwise": "ours: layerwise", "jacobian": "ours: jacobian",
            "auto": "ours: auto",
            "naive": "naive loop", "vmap": "torch.func vmap",
            # peers (bench/peers.py, optional `bench` extra)
            "backpack": "BackPACK BatchGrad", "opacus": "Opacus GradSampleModule",
            "nngeometry": "nngeometry Jacobian", "nngeometry_gram": "nngeometry GramMatrix",
            "captum": "Captum TracInCP"}


def _method_cell(row: Mapping[str, Any]) -> str:
    """The method's label, with how a peer ran when that matters (e.g. on a copy of the model
    without in-place activations, or Captum's per-example path)."""
    label = _METHODS.get(row.get("method"), _cell(row.get("method")))
    variants = [_cell(v) for v in (row.get("captum_mode"), row.get("variant")) if v]
    return f"{label} ({'; '.join(variants)})" if variants else label


def _perf_status(row: Mapping[str, Any]) -> str:
    status = row.get("status", "?")
    if status == "infeasible":
        return f"infeasible (G needs {row.get('needs_gb', float('nan')):.1f} GB)"
    if status == "skipped":
        if row.get("projected_s") is not None:
            return f"skipped (projected {row['projected_s']:.0f} s)"
        return f"skipped ({row.get('reason', 'cap')})"
    return _cell(status)


def _goal_lines(res: Mapping[str, Any]) -> list[str]:
    """The goals table of a results.json (no lines without goals)."""
    goals = res.get("goals") or []
    if not goals:
        return []
    lines = ["| Goal | Measured | Target | Met |", "| --- | --- | --- | --- |"]
    for g in goals:
        m = g.get("measured")
        note = f" — {g['note']}" if g.get("note") else ""
        lines.append(f"| {_cell(g.get('goal'))}{_cell(note) if note else ''} | {'—' if m is None else f'{m:.3g}'} "
                     f"| {_cell(g.get('target'))} | {'yes' if g.get('met') else 'no'} |")
    return lines


#: Our engines (and auto's pick of them); every other method but the epoch is a baseline or a peer.
_OURS = ("layerwise", "jacobian", "auto")


def _ours_versus_best_other(rows: list[Mapping[str, Any]], task: str) -> str:
    """One summary cell: our faster engine on `task` against the fastest other method that ran
    (baseline or peer), or why none ran."""
    mine = [r for r in rows if r.get("task") == task and r.get("method") in _OURS]
    others = [r for r in rows if r.get("task") == task and r.get("method") not in (*_OURS, "epoch")]
    ran = [r for r in mine if r.get("status") == "ok"]
    if not ran:
        return f"ours: {_perf_status(mine[0])}" if mine else "—"
    best = min(ran, key=lambda r: r["seconds"])
    x = best.get("x_epoch")
    cell = f"{best['seconds']:.3g} s" + ("" if x is None else f" = {x:.3g}× epoch") + f" ({_method_cell(best)})"
    rivals = [r for r in others if r.get("status") == "ok"]
    if rivals:
        rival = min(rivals, key=lambda r: r["seconds"])
        ratio = rival["seconds"] / best["seconds"]
        speed = f"{ratio:.3g}× faster" if ratio >= 1 else f"{1 / ratio:.3g}× slower"
        return f"{cell} vs {rival['seconds']:.3g} s ({_method_cell(rival)}): {speed}"
    if not others:
        return f"{cell}; no other method measured"
    why = []
    infeasible = [r["needs_gb"] for r in others if r.get("status") == "infeasible" and r.get("needs_gb") is not None]
    if infeasible:
        why.append(f"G needs {min(infeasible):.1f} GB")
    projected = [r["projected_s"] for r in others if r.get("status") == "skipped" and r.get("projected_s") is not None]
    if projected:
        why.append(f"projected ≥ {min(projected):.0f} s")
    if any(str(r.get("status", "")).startswith("error") for r in others):
        why.append("unsupported")
    return f"{cell}; none of the {len(others)} others ran ({', '.join(why) or 'skipped'})"


def _goal_summary(res: Mapping[str, Any]) -> list[str]:
    """The README's line on the goals: how many are met, each missed one with its measurement (the
    table of every goal is in `bench/RESULTS.md`)."""
    goals = res.get("goals") or []
    if not goals:
        return []
    missed = [g for g in goals if not g.get("met")]
    line = (f"**Goals: {len(goals) - len(missed)} of {len(goals)} met** (each with its note: "
            "[`bench/RESULTS.md`](bench/RESULTS.md)).")
    if missed:
        line += " Missed: " + "; ".join(f"{_cell(g.get('goal'))}: {_measured(g.get('measured'))}" for g in missed) + "."
    return [line]


def _measured(value) -> str:
    return "not measured" if value is None else f"{value:.3g}"


def performance_summary_markdown(results_json_path: Path | str) -> str:
    """The README's performance section from a `bench/results.json`: how many goals are met (and the
    missed ones), then one row per bench model at the largest N where our soft density ran, our
    faster engine against the fastest other method (baseline or peer) for the soft density and the
    N x N similarity."""
    res = json.loads(Path(results_json_path).read_text(encoding="utf-8"))
    results = res.get("results", [])
    table = []
    for model, info in (res.get("models") or {}).items():
        sizes = [r["n"] for r in results if r.get("model") == model and r.get("task") == "soft_density"
                 and r.get("method") in _OURS and r.get("status") == "ok" and r.get("n") is not None]
        if not sizes:
            continue
        n = max(sizes)
        rows = [r for r in results if r.get("model") == model and r.get("n") == n]
        params = f" ({info['params']:,} params)" if isinstance(info, Mapping) and info.get("params") else ""
        table.append(f"| {_cell(model)}{params} | {n} | {_ours_versus_best_other(rows, 'soft_density')} "
                     f"| {_ours_versus_best_other(rows, 'similarity')} |")
    lines = _goal_summary(res)
    if table:
        lines += ["", "| Model | N | Soft density: ours vs the fastest other "
                      "| Similarity N × N: ours vs the fastest other |", "| --- | --- | --- | --- |", *table]
    lines += ["", f"<sub>generated from `bench/results.json` ({res.get('mode', '?')} mode, {res.get('date', '?')}); "
                  "CPU seconds, 1 thread; × epoch: multiple of a training epoch of the same N</sub>"]
    return "\n".join(lines) + "\n"


def index_summary_markdown(index_json_path: Path | str, hf_json_path: Path | str | None = None) -> str:
    """The README's SimilarityIndex section from a `bench/index_results.json` (`bench/index.py`): its
    goals, the exact index's size, and the sketch's accuracy against exact k^C per sketch size; with
    `hf_json_path` (`bench/hf_index_results.json`, `bench/hf_index.py`) the language model's too."""
    res = json.loads(Path(index_json_path).read_text(encoding="utf-8"))
    hf = json.loads(Path(hf_json_path).read_text(encoding="utf-8")) if hf_json_path else None
    n, k = res["n"], res["default_sketch"]
    default = next(a for a in res["accuracy"] if a["k"] == k)
    scale = 50000 / n   # the disk goal is stated for the 50k index
    goals = [
        (f"build, d = 1 (`class_vs_rest`), sketch {k}, × epoch", f"{res['build_d1_x_epoch']:.2f}", "≤ 3",
         res["build_d1_x_epoch"] <= 3),
        (f"build, d = 10 (`neg_log_softmax`), sketch {k}, × epoch", f"{res['build_d10_x_epoch']:.2f}", "≤ 30",
         res["build_d10_x_epoch"] <= 30),
        (f"100 top-10 queries against the {n:,}-image index, × epoch", f"{res['query100_x_epoch']:.3f}", "≤ 0.1",
         res["query100_x_epoch"] <= 0.1),
        (f"top-10 recall vs exact k^C at sketch {k} ({res['pool']:,}-image pool, 200 test queries)",
         f"{default['recall_at_10']:.3f}", "≥ 0.9", default["recall_at_10"] >= 0.9),
        (f"disk of the 50k index at sketch {k}" + ("" if n == 50000 else f" (scaled from {n:,})"),
         f"{res['disk_d1_bytes'] * scale / 1e6:.0f} MB", "≤ 1 GB", res["disk_d1_bytes"] * scale <= 1e9),
    ]
    if hf is not None:
        goals += _hf_index_goals(hf)
    lines = ["| Goal | Measured | Target | Met |", "| --- | --- | --- | --- |"]
    lines += [f"| {g} | {m} | {t} | {'yes' if ok else 'no'} |" for g, m, t, ok in goals]
    accuracy = _sketch_accuracy(res["accuracy"])
    lines += ["", f"The exact index would take {res['disk_exact_d1_bytes_projected'] * scale / 1e9:.1f} GB for "
                  f"50k images ({res['values_per_sample_exact']:,} values per sample, against "
                  f"{res['values_per_sample_sketch']:,} sketched). Sketch size: recall@10 / median / 99th percentile "
                  rf"of \|k^C error\| — {accuracy} ([plot](bench/index_sketch.png))."]
    source = (f"`bench/index_results.json` (`bench/index.py`: the authors' MNIST CNN trained one pass over {n:,} real "
              f"training images, test accuracy {res['test_accuracy_200']:.1%} on 200 test images; epoch "
              f"{res['epoch_s']:.0f} s)")
    if hf is not None:
        plain = "; ".join(f"{a['k']}: {a['plain_count_sketch']['recall_at_10']:.2f}" for a in hf["accuracy"])
        lines += ["", rf"The language model's sketch: recall@10 / median / 99th percentile of \|k^C error\| — "
                      f"{_sketch_accuracy(hf['accuracy'])}; recall@10 of a plain count sketch of the formed gradients "
                      f"at the same sizes: {plain} ([plot](bench/hf_index_sketch.png)). Its neighbourhoods are flat: "
                      f"exact k^C of a test window to its 10 nearest pool windows {hf['exact_kc']['mean_top10']:.2f} "
                      f"on average, to the median one {hf['exact_kc']['median_row']:.3f}."]
        source += (f" and `bench/hf_index_results.json` (`bench/hf_index.py`: a GPT-2 language model, "
                   f"{hf['params'] / 1e6:.1f}M parameters, trained here on {hf['setting']['n']:,} windows of "
                   f"{hf['setting']['length']} tokens of the Python documentation; epoch {hf['epoch_s']:.0f} s)")
    lines += ["", f"<sub>generated from {source}; CPU seconds, 1 thread</sub>"]
    return "\n".join(lines) + "\n"


def index_scale_markdown(path: Path | str) -> str:
    """The README's table of the index against N (`bench/index_scale.py`): build and sizes, the exact
    and the approximate top-10 query (at the default nprobe, and the smallest nprobe with recall >=
    0.95), and a projection to 100M samples from the measured slopes (the exact search grows as N,
    the approximate one as measured between the two largest N)."""
    res = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = res["sizes"]
    lines = []
    goals = index_scale_goals(res)
    if goals:
        met = [g for g in goals if g[3]]
        lines += [f"**Goals at {rows[-1]['n']:,} samples: {len(met)} of {len(goals)} met**: "
                  + "; ".join(f"{name} {measured} ({target}{'' if ok else ', missed'})"
                              for name, measured, target, ok in goals) + ".", ""]
    lines += ["| N | build × epoch | approximate index: build × epoch | disk: index / approximate | exact query "
             "| approximate query, default nprobe: time, recall@10 | smallest nprobe with recall@10 ≥ 0.95 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        default = next((a for a in r["approximate"] if a["nprobe"] == r["default_nprobe"]), None)
        good = next((a for a in r["approximate"] if a["recall_at_10"] >= 0.95), None)
        lines.append(
            f"| {r['n']:,} | {r['build_s'] / r['epoch_s']:.2f} | {r['ann_build_s'] / r['epoch_s']:.2f} | "
            f"{r['index_bytes'] / 2**30:.2f} / {r['ann_bytes'] / 2**30:.2f} GiB | {r['exact_query_ms']:.0f} ms | "
            + (f"{default['query_ms']:.1f} ms, {default['recall_at_10']:.3f} (nprobe {default['nprobe']} of "
               f"{r['nlist']})" if default else "—") + " | "
            + (f"{good['nprobe']}: {good['query_ms']:.1f} ms, {good['recall_at_10']:.3f}" if good else "none measured")
            + " |")
    if len(rows) >= 2:
        a, b = rows[-2], rows[-1]
        growth = math.log(b["n"] / a["n"])
        at = {r["n"]: next((x for x in r["approximate"] if x["nprobe"] == r["default_nprobe"]), None) for r in (a, b)}
        target = 100_000_000
        scale = target / b["n"]
        line = (f"Projection to {target / 1e6:.0f}M samples from the slopes between {a['n']:,} and {b['n']:,}: "
                f"index {b['index_bytes'] * scale / 2**30:.0f} GiB and approximate index "
                f"{b['ann_bytes'] * scale / 2**30:.0f} GiB on disk (linear), build {b['build_s'] * scale / 3600:.0f} "
                f"CPU hours (linear: {b['build_s'] * scale / 3600 / 64:.1f} h on 64 workers with `num_shards`); "
                f"the exact query {b['exact_query_ms'] * scale / 1000:.0f} s (linear)")
        if at[a["n"]] and at[b["n"]]:
            slope = math.log(at[b["n"]]["query_ms"] / at[a["n"]]["query_ms"]) / growth
            line += (f", the approximate one {at[b['n']]['query_ms'] * scale ** slope:.0f} ms (N^{slope:.2f}, "
                     "as measured; its memory would be split over machines, each searching its shards' lists)")
        lines += ["", line + "."]
    lines += ["", f"<sub>generated from `bench/index_scale_results.json` (`bench/index_scale.py`: {res['data']}; the "
                  f"authors' MNIST CNN, `class_vs_rest`, sketch {res['sketch']}; 100 test-image queries; CPU time, "
                  f"1 thread, the query's own sketch included; epoch {res['epoch_50k_s']:.0f} s per 50k)</sub>"]
    return "\n".join(lines) + "\n"


def index_scale_goals(res: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Issue 21's goals, read at the largest N measured if it reaches 1M samples: the approximate
    top-10 query at the default nprobe (CPU ms, recall@10 against the exact search), the
    approximate index's size against the index's and its build time against an epoch."""
    r = res["sizes"][-1] if res["sizes"] else None
    if r is None or r["n"] < 1_000_000:
        return []
    at = next((a for a in r["approximate"] if a["nprobe"] == r["default_nprobe"]), None)
    goals = []
    if at is not None:
        goals += [("approximate query", f"{at['query_ms']:.1f} ms", "≤ 50 ms", at["query_ms"] <= 50),
                  ("its recall@10", f"{at['recall_at_10']:.3f}", "≥ 0.95", at["recall_at_10"] >= 0.95)]
    goals += [("approximate index on disk", f"{r['ann_bytes'] / r['index_bytes']:.2f}× the index", "≤ 1×",
               r["ann_bytes"] <= r["index_bytes"]),
              ("its build", f"{r['ann_build_s'] / r['epoch_s']:.2f}× an epoch", "≤ 1×",
               r["ann_build_s"] <= r["epoch_s"])]
    return goals


def _sketch_accuracy(rows: list) -> str:
    return "; ".join(f"{a['k']}: {a['recall_at_10']:.2f} / {a['median_abs_err']:.3f} / {a['p99_abs_err']:.3f}"
                     for a in rows)


def _hf_index_goals(hf: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The language model's index goals (`bench/hf_index.py`): build cost, recall, peak memory."""
    k = 1024
    default = next(a for a in hf["accuracy"] if a["k"] == k)
    budget = hf["memory_budget_bytes"]
    peak = hf["build"]["peak_extra_mb"] * 2**20
    model = f"GPT-2 LM ({hf['params'] / 1e6:.1f}M parameters, {hf['setting']['n']:,} windows)"
    rows = [
        (f"{model}: build, sketch {k}, × epoch", f"{hf['build_x_epoch']:.2f}", "≤ 3", hf["build_x_epoch"] <= 3),
        (f"{model}: top-10 recall vs exact k^C at sketch {k} ({hf['setting']['pool']:,}-window pool, 100 test "
         "windows)", f"{default['recall_at_10']:.3f}", "≥ 0.9", default["recall_at_10"] >= 0.9),
        (f"{model}: peak resident memory of the build, glibc's retained heap included (the dense gradients of one "
         f"chunk: {hf['dense_chunk_bytes'] / 2**30:.1f} GiB)", f"{peak / 2**30:.2f} GiB",
         f"≤ budget {budget / 2**30:.1f} GiB", peak <= budget),
    ]
    refine = hf.get("refine")
    if refine is not None:
        per_query = refine["seconds"] / refine["queries"]
        rows.insert(2, (f"{model}: top-10 recall of `refine` ({refine['candidates']} proposals per test window from "
                        f"the sketch at {refine['k']}, ranked by exact k^C; {per_query:.1f} s per query)",
                        f"{refine['recall_at_10']:.3f}", "≥ 0.9", refine["recall_at_10"] >= 0.9))
    return rows


def results_page_markdown(results_json_path: Path | str) -> str:
    """`bench/RESULTS.md`: a title, where it comes from, then `performance_markdown`, and the memory
    budget's curve (`memory_budget_markdown`) when `memory_budget_results.json` lies beside it."""
    page = ("# Benchmark results\n\n"
            "Generated from `results.json` by `python -m netsim_paper.report update-readme` (run by "
            "`./run_all.sh`); never edited by hand. What is measured and how: [README.md](README.md).\n\n"
            + performance_markdown(results_json_path))
    curve = Path(results_json_path).with_name("memory_budget_results.json")
    return page + ("\n" + memory_budget_markdown(curve) if curve.is_file() else "")


def memory_budget_markdown(path: Path | str) -> str:
    """The time and peak memory of the streaming functions against `memory_budget`
    (`bench/memory_budget.py`): one row per task, one column per budget."""
    res = json.loads(Path(path).read_text(encoding="utf-8"))
    budgets = sorted({r["budget_bytes"] for r in res["rows"]})
    lines = ["## Memory budget", "",
             f"CPU seconds / peak MB above the call's start, against `memory_budget` (`bench/memory_budget.py`, "
             f"{res.get('date', '?')}, {_cell(res.get('machine'))}, 1 thread; the default is "
             f"{res['default_budget_bytes'] / 2**20:.0f} MiB):", "",
             "| Task | N | " + " | ".join(f"{b / 2**20:.0f} MiB" for b in budgets) + " |",
             "| --- | --- | " + " | ".join("---" for _ in budgets) + " |"]
    tasks = list(dict.fromkeys((r["model"], r["n"], r["task"]) for r in res["rows"]))
    for model, n, task in tasks:
        cells = []
        for b in budgets:
            row = next((r for r in res["rows"] if (r["model"], r["n"], r["task"], r["budget_bytes"]) ==
                        (model, n, task, b)), None)
            cells.append("—" if row is None else _cell(row["error"]) if "error" in row else
                         f"{row['seconds']:.3g} s / {row['peak_extra_mb']:.0f} MB")
        lines.append(f"| {task} ({_cell(model)}) | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def performance_markdown(results_json_path: Path | str) -> str:
    """Markdown of a `bench/results.json` (written by `python bench/run.py`): one table row per
    (model, N, task, method) with CPU seconds, multiple of the training epoch and peak extra
    memory, then the goals with measured value, target and whether they are met."""
    res = json.loads(Path(results_json_path).read_text(encoding="utf-8"))
    machine, settings = res.get("machine", {}), res.get("settings", {})
    lines = [f"Mode `{res.get('mode', '?')}`, {res.get('date', '?')}, {_cell(machine.get('cpu_model'))} "
             f"({machine.get('cores', '?')} cores), torch {machine.get('torch', '?')}, 1 thread. "
             f"Times: {_cell(settings.get('timing', 'process CPU time'))}. Epoch: {_cell(settings.get('epoch', '?'))}. "
             "Peak extra MB: peak RSS of the measurement's own process minus its RSS after setup."
             + (f" Note: {_cell(res['note'])}" if res.get("note") else ""), "",
             "| Model | N | Task | Method | Seconds | × epoch | Peak extra MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in res.get("results", []):
        method = _method_cell(row)
        n = "—" if row.get("n") is None else str(row["n"])
        if row.get("status") == "ok":
            x = row.get("x_epoch")
            cells = [f"{row['seconds']:.3g}", "—" if x is None else f"{x:.3g}",
                     f"{row.get('peak_extra_mb', 0.0):.0f}"]
        else:
            cells = [_perf_status(row), "—", "—"]
        lines.append(f"| {_cell(row.get('model'))} | {n} | {_cell(row.get('task'))} | {method} | "
                     + " | ".join(cells) + " |")
    gemm, eff = res.get("gemm") or {}, res.get("gemm_efficiency") or {}
    if gemm.get("gflops") is not None:
        line = f"torch.mm {gemm.get('n', '?')}² (1 thread): {gemm['gflops']:.1f} GFLOP/s"
        if eff.get("gram_gflops") is not None:
            line += (f"; layer-wise gram of the MLP similarity (N = {eff['n']}): {eff['gram_gflops']:.1f} GFLOP/s "
                     f"({eff['efficiency']:.0%} of torch.mm)")
        lines += ["", line + "."]
    threads = res.get("threads_summary") or {}
    if threads:
        lines += ["", "Threads (wall time, 1 vs 2 torch threads): " + "; ".join(
            f"{k}: {v['wall_1']:.3g} s vs {v['wall_2']:.3g} s" for k, v in threads.items()) + "."]
    peers = res.get("peers") or {}
    if peers:
        lines += ["", "Peers: " + "; ".join(f"{_cell(k)} {_cell(v)}" for k, v in peers.items()) + "."]
    goals = _goal_lines(res)
    if goals:
        lines += ["", *goals]
    budgets = res.get("budgets")
    if budgets:
        lines += ["", f"Run-time budgets ({_cell(budgets.get('note'))}; `bench/budgets.py`, "
                      f"{budgets.get('date', '?')}):", "",
                  "| What | Seconds | Budget (s) | Met |", "| --- | --- | --- | --- |"]
        for row in budgets.get("rows", []):
            lines.append(f"| {_cell(row.get('what'))} | {row.get('seconds', float('nan')):.0f} | "
                         f"{row.get('budget_s', '?')} | {'yes' if row.get('met') else 'no'} |")
    lines += ["", f"<sub>generated from `bench/results.json` ({res.get('mode', '?')} mode)</sub>"]
    return "\n".join(lines) + "\n"


def _has_markers(text: str, start: str, end: str) -> bool:
    return text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)


def _fill(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body}{end}{tail}"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        _atomic_write_text(path, text)


def update_readme(readme: Path | str | None = None, figures: Path | str | None = None,
                  bench_results: Path | str | None = None) -> Path:
    """Regenerate the README's generated sections and `bench/RESULTS.md`.

    - Between the results markers: `results_markdown(figures)` (required markers); when
      `figures/` holds metrics, every row also goes to `figures/RESULTS.md`.
    - Between the regime markers, when present and the metrics exist: `paper_regime_markdown`.
    - When the bench results exist: between the performance markers (if present)
      `performance_summary_markdown`, and `RESULTS.md` beside the results file
      (`results_page_markdown`). Otherwise those are left alone.
    - When `index_results.json` exists beside them: between the index markers (if present)
      `index_summary_markdown`, with `hf_index_results.json` when it exists too.
    - When `index_scale_results.json` exists beside them: between the index-scale markers (if
      present) `index_scale_markdown`; `memory_budget_results.json`'s curve goes to `RESULTS.md`.

    Args:
        readme: defaults to `<repo>/README.md`.
        figures: defaults to `figures/` beside the README.
        bench_results: defaults to `bench/results.json` beside the README.

    Raises:
        ValueError: the results markers are missing, repeated or out of order (nothing is
            written then).
    """
    readme = Path(readme) if readme is not None else repo_root() / "README.md"
    figures = Path(figures) if figures is not None else readme.parent / "figures"
    bench_results = Path(bench_results) if bench_results is not None else readme.parent / "bench" / "results.json"
    text = readme.read_text(encoding="utf-8")
    if not _has_markers(text, START, END):
        raise ValueError(f"{readme} must contain exactly one {START} followed by one {END}")
    new = _fill(text, START, END, results_markdown(figures))
    if _metrics(figures):
        _write_if_changed(figures / "RESULTS.md", figures_page_markdown(figures))
    regime = paper_regime_markdown(figures)
    if regime is not None and _has_markers(new, REGIME_START, REGIME_END):
        new = _fill(new, REGIME_START, REGIME_END, regime)
    if bench_results.is_file():
        if _has_markers(new, PERF_START, PERF_END):
            new = _fill(new, PERF_START, PERF_END, performance_summary_markdown(bench_results))
        _write_if_changed(bench_results.with_name("RESULTS.md"), results_page_markdown(bench_results))
    index_results, hf_results = bench_results.with_name("index_results.json"), bench_results.with_name(
        "hf_index_results.json")
    if index_results.is_file() and _has_markers(new, INDEX_START, INDEX_END):
        new = _fill(new, INDEX_START, INDEX_END, index_summary_markdown(
            index_results, hf_results if hf_results.is_file() else None))
    scale_results = bench_results.with_name("index_scale_results.json")
    if scale_results.is_file() and _has_markers(new, SCALE_START, SCALE_END):
        new = _fill(new, SCALE_START, SCALE_END, index_scale_markdown(scale_results))
    if new != text:
        _atomic_write_text(readme, new)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim_paper.report", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("update-readme", help="regenerate the README results table from figures/*.json")
    up.add_argument("--readme", type=Path, default=None, help="default: <repo>/README.md")
    up.add_argument("--figures", type=Path, default=None, help="default: figures/ beside the README")
    up.add_argument("--bench-results", type=Path, default=None,
                    help="default: bench/results.json beside the README (fills the performance markers if "
                         "present, and writes RESULTS.md beside it)")
    args = parser.parse_args(argv)
    if args.command == "update-readme":
        try:
            path = update_readme(args.readme, args.figures, args.bench_results)
        except (OSError, ValueError) as err:
            print(f"update-readme: {err}", file=sys.stderr)
            return 1
        print(f"updated results table in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
