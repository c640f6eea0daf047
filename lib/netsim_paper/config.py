"""The smoke / paper profiles of every experiment, in one place.

Each notebook's `parameters` cell holds only `profile` and `seed`; everything else it
needs comes from here::

    >>> from netsim_paper import config
    >>> cfg = config.load("kernel_tour", "smoke")
    >>> cfg.n_train, cfg.hidden
    (256, 32)
    >>> config.config_hash(cfg) == config.config_hash(config.EXPERIMENTS["kernel_tour"]["smoke"])
    True

`smoke` runs each notebook in about a minute on 2 CPU cores and still checks its claim with
looser thresholds; `paper` produces the published figure. Adding an experiment is adding one
entry to `EXPERIMENTS` with both profiles, holding plain JSON values only (they are hashed
into cache keys, see `config_hash`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROFILES: tuple[str, ...] = ("smoke", "paper")

#: experiment name -> profile name -> plain-JSON settings.
EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {
    "kernel_tour": {
        "smoke": {"n_train": 256, "epochs": 150, "hidden": 32, "lr": 1e-3, "frequency": 2},
        "paper": {"n_train": 1024, "epochs": 300, "hidden": 64, "lr": 1e-3, "frequency": 2},
    },
    # Fig. 4 (section 4.3), the authors' protocol: 160k Adam steps (5000 epochs of 32 batches).
    "sinusoid": {
        "smoke": {"n": 512, "frequencies": [1, 4, 16], "seeds": [0, 1], "epochs": 400,
                  "lr": 1e-3, "batch_size": 64, "hidden": 64, "depth": 5,
                  "taus": [0.5, 0.9, 0.99], "alphas": [2], "n_boot": 200},
        "paper": {"n": 2048, "frequencies": [1, 2, 4, 8, 16], "seeds": [0, 1, 2, 3, 4],
                  "epochs": 5000, "lr": 1e-4, "batch_size": 64, "hidden": 64, "depth": 5,
                  "taus": [0.5, 0.6, 0.7, 0.8, 0.9, 0.925, 0.95, 0.975, 0.99],
                  "alphas": [2, 3, 4], "n_boot": 2000},
    },
    # Fig. 5 (section 5). The authors: 60 paired runs, 513 steps, 1000 validation images after
    # every step -- ~12 h of validation alone on 2 cores; the paper profile keeps the figure's
    # 150 steps and measures on the schedule below (see notebook 03).
    "mnist_speedup": {
        "smoke": {"runs": 4, "steps": 40, "n_b": 1, "arms": ["ce", "paper", "neg_cos", "pos_cos"],
                  "eval_early_every": 4, "eval_early_until": 40, "eval_late_every": 10, "eval_size": 200,
                  "large_n_b": 8, "large_n_b_runs": 2, "large_n_b_arms": ["ce", "paper"], "lr": 1e-3,
                  "n_boot": 1000},
        "paper": {"runs": 24, "steps": 150, "n_b": 1, "arms": ["ce", "paper", "neg_cos", "pos_cos"],
                  "eval_early_every": 2, "eval_early_until": 60, "eval_late_every": 10, "eval_size": 400,
                  "large_n_b": 8, "large_n_b_runs": 12, "large_n_b_arms": ["ce", "paper"], "lr": 1e-3,
                  "n_boot": 10000},
    },
    # Section 1 / Fig. 2: multiscale registration chain on synthetic 256-px tiles.
    # noise_px 12 (bump fields, cov_scale 0.015, |grad| < 0.5) gives a median per-vertex label
    # noise of ~7 px, about a fifth of the median building width (~35 px). Perturbation
    # amplitudes are full-resolution pixels per stage; caps are pixels of each stage's scale.
    # GroupNorm, lr 3e-3 with warm-up + cosine decay, and finer stages started from the coarser
    # one: without them the finer stages did not leave their initial plateau in 600 steps.
    # Perturbations are "bumps", the noise's own recipe and scale (a network that can tell them
    # apart by smoothness learns to leave the noise alone); the coarse stage gets most steps:
    # round-1 gain 0.16 -> 0.25 (bumps) and 0.16 -> 0.45 (1600 coarse steps), measured.
    "registration": {
        "smoke": {"tile_size": 256, "train_tiles": 8, "heldout_tiles": 4, "tile_seed": 0, "seed": 0,
                  "noise_px": 12.0, "noise_cov_scale": 0.015, "scales": [4, 2, 1], "caps": [8.0, 6.0, 6.0],
                  "channels": [8, 16, 32], "norm": "group", "perturbation_px": [24.0, 8.0, 4.0],
                  "perturbation_kind": "bumps", "steps": [150, 60, 60], "warmup": 20, "init_from_coarser": True, "batch_size": 4, "crop": 64,
                  "lr": 3e-3, "rounds": 2, "control_rounds": 1, "extra_noise_factor": 1.5,
                  "sweep_noise_factors": [0.5]},
        "paper": {"tile_size": 256, "train_tiles": 48, "heldout_tiles": 16, "tile_seed": 0, "seed": 0,
                  "noise_px": 12.0, "noise_cov_scale": 0.015, "scales": [4, 2, 1], "caps": [8.0, 6.0, 6.0],
                  "channels": [16, 32, 64], "norm": "group", "perturbation_px": [24.0, 8.0, 4.0],
                  "perturbation_kind": "bumps", "steps": [1600, 400, 400], "warmup": 50, "init_from_coarser": True, "batch_size": 8, "crop": 64,
                  "lr": 3e-3, "rounds": 3, "control_rounds": 2, "extra_noise_factor": 1.5,
                  "sweep_noise_factors": [0.5]},
    },
    # Figs. 6-7 (section 6): patches of the registration training tiles seen through each round's
    # coarse stage (stage 0, downsampling 4). The authors: ~3600 patches, 10 per tile, ~10 queries, 10 neighbours each.
    # Every patch is also a query of the quantitative comparison (the P x P kernels, notebook 04).
    "neighbor_patches": {
        "smoke": {"patch": 64, "per_tile": 8, "queries": 4, "neighbours": 10, "perceptual_level": 1, "stage": 0},
        "paper": {"patch": 64, "per_tile": 10, "queries": 10, "neighbours": 10, "perceptual_level": 1, "stage": 0},
    },
    # Fig. 7 and the talk's self-denoising estimate (notebook 05; its patches and query are
    # notebook 04's). Factor variants: [output, parameters], "no_head" = last 1x1 conv excluded.
    "similarity_histograms": {
        "smoke": {"bins": 100, "denoising_round": 1, "denoising_queries": 40,
                  "factor_variants": [["mean", "all"], ["mean", "no_head"], ["vertices", "all"],
                                      ["vertices", "no_head"]]},
        "paper": {"bins": 100, "denoising_round": 1, "denoising_queries": 100,
                  "factor_variants": [["mean", "all"], ["mean", "no_head"], ["vertices", "all"],
                                      ["vertices", "no_head"]]},
    },
}


def repo_root() -> Path:
    """The repository root: the nearest ancestor of this file holding `run_all.sh`.

    The package is installed editable from `lib/`, so this finds the checkout; for a
    non-editable install (no checkout above the package) it falls back to the current
    working directory.
    """
    for parent in Path(__file__).resolve().parents:
        if (parent / "run_all.sh").is_file():
            return parent
    return Path.cwd()


def check_profile(profile: str) -> str:
    """Return `profile` if it is one of `PROFILES`, else raise ValueError listing them."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    return profile


def _check_experiment(experiment: str) -> dict[str, dict[str, Any]]:
    if experiment not in EXPERIMENTS:
        valid = ", ".join(sorted(EXPERIMENTS))
        raise ValueError(f"unknown experiment {experiment!r}; valid experiments: {valid}")
    return EXPERIMENTS[experiment]


def load(experiment: str, profile: str) -> types.SimpleNamespace:
    """The settings of `experiment` in `profile`, as attributes.

    Args:
        experiment: a key of `EXPERIMENTS`, e.g. "kernel_tour".
        profile: "smoke" or "paper".

    Returns:
        A fresh namespace (a deep copy: changing it never changes the registry).

    Raises:
        ValueError: unknown experiment or profile; the message lists the valid names.
    """
    profiles = _check_experiment(experiment)
    check_profile(profile)
    return types.SimpleNamespace(**copy.deepcopy(profiles[profile]))


def _plain(cfg: Any) -> Any:
    """Turn namespaces / dataclasses / mappings / tuples into plain JSON-able values."""
    if isinstance(cfg, types.SimpleNamespace):
        cfg = vars(cfg)
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    if isinstance(cfg, Mapping):
        out = {}
        for key, value in cfg.items():
            if not isinstance(key, str):
                raise TypeError(f"config keys must be strings, got {key!r}")
            out[key] = _plain(value)
        return out
    if isinstance(cfg, (list, tuple)):
        return [_plain(v) for v in cfg]
    if cfg is None or isinstance(cfg, (str, int, float, bool)):
        return cfg
    raise TypeError(f"config values must be plain JSON values, got {type(cfg).__name__}: {cfg!r}")


def config_hash(cfg: Any) -> str:
    """A stable 16-hex-digit key for a config: sha256 of its canonical JSON.

    Canonical = sorted keys, no whitespace, tuples as lists. Key order never matters; any
    changed value does (note that 1 and 1.0 are different JSON and hash differently).

    Args:
        cfg: a namespace from `load`, a dict, or a dataclass instance of plain values.
    """
    text = json.dumps(_plain(cfg), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_dir(experiment: str, profile: str, cfg: Any, *, root: Path | None = None) -> Path:
    """Directory for cached artefacts of one config: `data/cache/<profile>/<experiment>/<hash>/`.

    Keyed by `config_hash(cfg)`, so a changed config never reads a stale cache. The directory
    is created.

    Args:
        experiment: a key of `EXPERIMENTS`.
        profile: "smoke" or "paper".
        cfg: the config the artefacts were computed from.
        root: the `data/` directory; defaults to `<repo>/data`.
    """
    _check_experiment(experiment)
    check_profile(profile)
    base = Path(root) if root is not None else repo_root() / "data"
    path = base / "cache" / profile / experiment / config_hash(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path
