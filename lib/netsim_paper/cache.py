"""Caching expensive artefacts (trained networks, gradient statistics) on disk.

Artefacts live in `config.cache_dir(experiment, profile, cfg)`, a directory keyed by the hash
of the config that produced them, so a changed config never reads a stale cache. Writes are
atomic (temporary file + rename): an interrupted run leaves either the old artefact or none.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cached(path: Path | str, compute: Callable[[], T], *, refresh: bool = False) -> T:
    """Load `path` if present, else `compute()` and save the result there.

    Only for artefacts this project wrote itself: loading unpickles arbitrary objects
    (`weights_only=False`), e.g. whole `nn.Module`s.

    Args:
        path: the artefact file, inside a config-keyed cache directory.
        compute: produces the artefact when it is missing.
        refresh: recompute and overwrite even if present.
    """
    path = Path(path)
    if path.exists() and not refresh:
        return torch.load(path, weights_only=False)
    result = compute()
    save_atomic(result, path)
    return result
