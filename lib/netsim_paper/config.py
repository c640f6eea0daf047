"""The smoke / paper profiles of every experiment, their registry, config hashes and cache
directories.

Each experiment's settings are a frozen dataclass beside the experiment
(`sinusoid/config.py`, `mnist/config.py`, `registration/config.py`, `audit/config.py`, `hf/config.py`)
with a `SMOKE` and a `PAPER` instance. Each notebook's `parameters` cell holds only `profile` and `seed`;
everything else it needs comes from here::

    >>> import dataclasses
    >>> from netsim_paper import config
    >>> cfg = config.load("kernel_tour", "smoke")
    >>> cfg.n_train, cfg.hidden
    (256, 32)
    >>> longer = dataclasses.replace(cfg, epochs=300)   # a variant; `cfg` itself never changes
    >>> config.config_hash(longer) != config.config_hash(cfg)
    True

`smoke` runs each notebook in about a minute on 2 CPU cores and still checks its claim with
looser thresholds; `paper` produces the published figure. Adding an experiment is adding one
frozen dataclass of plain JSON values (tuples for sequences: they are hashed into cache keys,
see `config_hash`) with a `RECIPE` version and both profiles, and one entry in `EXPERIMENTS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .audit.config import DataAuditConfig
from .hf.config import HuggingFaceConfig
from .mnist.config import MnistSpeedupConfig
from .registration.config import NeighborPatchesConfig, RegistrationConfig, SimilarityHistogramsConfig
from .sinusoid.config import KernelTourConfig, SinusoidConfig

PROFILES: tuple[str, ...] = ("smoke", "paper")

#: experiment name -> its config class, which holds the `SMOKE` and `PAPER` instances and the
#: `RECIPE` version of the code constants that shape its cached results.
EXPERIMENTS: dict[str, type] = {
    "kernel_tour": KernelTourConfig,
    "sinusoid": SinusoidConfig,
    "mnist_speedup": MnistSpeedupConfig,
    "registration": RegistrationConfig,
    "neighbor_patches": NeighborPatchesConfig,
    "similarity_histograms": SimilarityHistogramsConfig,
    "data_audit": DataAuditConfig,
    "huggingface": HuggingFaceConfig,
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


def _config_class(experiment: str) -> type:
    if experiment not in EXPERIMENTS:
        valid = ", ".join(sorted(EXPERIMENTS))
        raise ValueError(f"unknown experiment {experiment!r}; valid experiments: {valid}")
    return EXPERIMENTS[experiment]


def load(experiment: str, profile: str) -> Any:
    """The settings of `experiment` in `profile`.

    Args:
        experiment: a key of `EXPERIMENTS`, e.g. "kernel_tour".
        profile: "smoke" or "paper".

    Returns:
        The profile's frozen dataclass instance (`cls.SMOKE` or `cls.PAPER`): assigning a
        field raises `dataclasses.FrozenInstanceError`; make a variant with
        `dataclasses.replace(cfg, seed=1)`.

    Raises:
        ValueError: unknown experiment or profile; the message lists the valid names.
    """
    cls = _config_class(experiment)
    return getattr(cls, check_profile(profile).upper())


def _plain(cfg: Any) -> Any:
    """Turn namespaces / dataclasses / mappings / tuples into plain JSON-able values."""
    if isinstance(cfg, types.SimpleNamespace):
        cfg = vars(cfg)
    elif dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(cfg)}
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
    changed value does (note that 1 and 1.0 are different JSON and hash differently). A
    config class's `RECIPE` version is hashed with the values, so bumping it changes every
    key of that experiment.

    Args:
        cfg: a config from `load` (or a `dataclasses.replace` of one), a dict, a namespace
            or another dataclass instance of plain values.
    """
    plain = _plain(cfg)
    recipe = getattr(type(cfg), "RECIPE", None)
    if recipe is not None:
        plain = {"recipe": recipe, "settings": plain}
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_dir(experiment: str, profile: str, cfg: Any, *, root: Path | None = None) -> Path:
    """Directory for cached artefacts of one config: `data/cache/<profile>/<experiment>/<hash>/`.

    Keyed by `config_hash(cfg)`, which covers the settings and the experiment's `RECIPE`
    version, so a changed config or recipe never reads a stale cache. The directory is
    created.

    Args:
        experiment: a key of `EXPERIMENTS`.
        profile: "smoke" or "paper".
        cfg: the config the artefacts were computed from: an instance of the experiment's
            config class (a plain dict or namespace would lose the recipe version).
        root: the `data/` directory; defaults to `<repo>/data`.

    Raises:
        ValueError: unknown experiment or profile.
        TypeError: `cfg` is not an instance of the experiment's config class.
    """
    cls = _config_class(experiment)
    check_profile(profile)
    if not isinstance(cfg, cls):
        raise TypeError(f"cache_dir({experiment!r}) needs a {cls.__name__} (from config.load, or a "
                        f"dataclasses.replace of one), got {type(cfg).__name__}")
    base = Path(root) if root is not None else repo_root() / "data"
    path = base / "cache" / profile / experiment / config_hash(cfg)
    path.mkdir(parents=True, exist_ok=True)
    return path
