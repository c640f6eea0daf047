"""Caching expensive artefacts (trained weights, gradient statistics) on disk, safely.

Artefacts live in `config.cache_dir(experiment, profile, cfg)`, a directory keyed by the
config and its recipe version, so a changed config never reads a stale cache. On top of that
the cache cannot lie:

- Payloads are plain data: tensors, dict / list / tuple of them, and str / int / float /
  bool / None. Anything else (an `nn.Module`, a NumPy array, a custom object) is refused when
  it is saved, naming where it sits in the payload. Loads use `torch.load(weights_only=True)`,
  so a file planted at a cache path cannot run code.
- Each file is a one-line header holding the sha256 and length of the payload bytes, then
  those bytes. A file whose header, length or checksum does not match (corrupt, truncated,
  written by something else) is reported with its path (a `CorruptCacheWarning`) and rebuilt
  by `cached`.
- Writes are atomic: a temporary file named after the writer's pid, then `os.replace`. An
  interrupted run leaves either the old artefact or none; the temporary files of writers that
  are no longer alive are removed by the next `cached` call in that directory (pids are
  those of this machine: a cache directory shared between machines is not supported).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_MAGIC = b"netsim-cache v1"
_HEADER = re.compile(rb"netsim-cache v1 sha256=([0-9a-f]{64}) bytes=(\d+)\n")
_MAX_HEADER = 128
_SCALARS = (str, int, float, bool, type(None))
_TEMP = re.compile(r"^\..+\.pid(\d+)\.[^.]+\.tmp$")


class CorruptCacheWarning(UserWarning):
    """A cache file failed verification (or could not be loaded safely) and is being rebuilt."""


class CorruptCacheEntry(ValueError):
    """A cache file that fails verification: bad header, wrong length, wrong checksum or an
    unsafe / unreadable payload. The message names the path."""


def check_payload(obj: Any, where: str = "payload") -> None:
    """Raise TypeError unless `obj` is plain cache data.

    Plain data is a `torch.Tensor` (or `nn.Parameter`), a str / int / float / bool / None, or a
    dict (keys of those scalar types), OrderedDict, list or tuple of plain data, at any depth.

    Args:
        obj: the payload.
        where: how the error names `obj`; nested values extend it, e.g. ``payload['rounds'][0]``.

    Raises:
        TypeError: naming the first offending value's place in the payload, its type and what
            to store instead.
    """
    if type(obj) in (torch.Tensor, torch.nn.Parameter) or type(obj) in _SCALARS:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in _SCALARS:
                raise TypeError(f"cache {where} has a key of type {type(key).__name__} ({key!r}): "
                                "keys must be str, int, float, bool or None")
            check_payload(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_payload(value, f"{where}[{i}]")
        return
    raise TypeError(f"cache {where} is a {_describe(obj)}; payloads hold only tensors, dict/list/tuple of them "
                    "and str/int/float/bool/None")


def _describe(obj: Any) -> str:
    """The offending value's type and what to store instead."""
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, torch.nn.Module):
        return f"{name} (an nn.Module): store its state_dict() and rebuild the module on load"
    if type(obj).__module__.split(".")[0] == "numpy":
        return f"{name}: convert it to a torch.Tensor (torch.from_numpy) or a Python scalar (.item())"
    if isinstance(obj, torch.Tensor):
        return f"{name} (a tensor subclass): store a plain torch.Tensor"
    return name


def _encode(obj: Any) -> bytes:
    """Header + `torch.save` bytes of a checked payload."""
    check_payload(obj)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    header = b"%s sha256=%s bytes=%d\n" % (_MAGIC, hashlib.sha256(payload).hexdigest().encode(), len(payload))
    return header + payload


def load(path: Path | str) -> Any:
    """Load and verify a cache file written by `save_atomic`.

    Raises:
        FileNotFoundError: no file at `path`.
        CorruptCacheEntry: the header, length or sha256 does not match, or the payload is not
            plain data that `torch.load(weights_only=True)` accepts (the message names `path`).
    """
    path = Path(path)
    data = path.read_bytes()
    newline = data.find(b"\n", 0, _MAX_HEADER)
    match = _HEADER.fullmatch(data[:newline + 1]) if newline >= 0 else None
    if match is None:
        raise CorruptCacheEntry(f"{path}: no netsim cache header (not written by netsim_paper.cache, or damaged)")
    payload = data[newline + 1:]
    if len(payload) != int(match[2]):
        raise CorruptCacheEntry(f"{path}: truncated or padded: {len(payload)} payload bytes, header says {match[2]}")
    if hashlib.sha256(payload).hexdigest() != match[1].decode():
        raise CorruptCacheEntry(f"{path}: sha256 of the payload does not match its header (corrupt file)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means: not a usable entry
        raise CorruptCacheEntry(f"{path}: payload refused by torch.load(weights_only=True): "
                                f"{type(err).__name__}: {str(err).strip()[:300]}") from err


def save_atomic(obj: Any, path: Path | str) -> None:
    """Write `obj` to `path` (header with sha256, then `torch.save` bytes) through a temporary
    file beside it, renamed into place.

    Raises:
        TypeError: `obj` is not plain data (see `check_payload`); nothing is written.
    """
    path = Path(path)
    data = _encode(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(directory: Path | str) -> list[Path]:
    """Delete the temporary files of `save_atomic` writers in `directory` whose pid is no longer
    alive (killed mid-write); return them. Files of live writers are left alone."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        match = _TEMP.match(entry.name)
        if match and not _pid_alive(int(match[1])):
            try:
                entry.unlink()
            except FileNotFoundError:  # another process cleaned it first
                continue
            removed.append(entry)
    return removed


def cached(path: Path | str, compute: Callable[[], T], *, refresh: bool = False) -> T:
    """Load `path` if present and valid, else `compute()` and save the result there.

    A present file that fails verification (see `load`) is reported with a
    `CorruptCacheWarning` naming it, then rebuilt. Leftover temporary files of dead writers
    in the same directory are removed first.

    Args:
        path: the artefact file, inside a config-keyed cache directory.
        compute: produces the artefact (plain data, see `check_payload`) when it is missing.
        refresh: recompute and overwrite even if present.

    Raises:
        TypeError: `compute()` returned something that is not plain data (nothing is written).
    """
    path = Path(path)
    remove_stale_temps(path.parent)
    if path.exists() and not refresh:
        try:
            return load(path)
        except CorruptCacheEntry as err:
            warnings.warn(f"rebuilding a bad cache entry: {err}", CorruptCacheWarning, stacklevel=2)
    result = compute()
    save_atomic(result, path)
    return result
