"""The on-disk format of a `SimilarityIndex`: a manifest and memory-mapped shards.

    <path>/manifest.json            settings, layout, sketch plan, versions, completed shards
    <path>/shard_00000/meta.json    its sample range and the SHA-256 of each array file
    <path>/shard_00000/e0_x.npy     arrays of entry 0 (a Linear layer: x, delta; dense: grads)
    ...

Writes are atomic: a shard is written to a temporary directory and renamed into place once
complete (with its checksums), and the manifest is replaced, never edited in place. A killed
build therefore leaves complete shards and at most a temporary directory, which the next build
removes. Shards are read with `numpy.load(mmap_mode="c")`: the arrays are paged in from disk as
they are used (copy-on-write, so nothing is ever written back). Each shard's checksums are
verified the first time a process reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .layerwise import DenseFactors, LinearFactors

FORMAT = 1
MANIFEST = "manifest.json"


class CorruptIndexError(RuntimeError):
    """A shard's files do not match the checksums recorded when it was written."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def write_json(path: Path, data: dict) -> None:
    """Atomic replacement of a JSON file (written next to it, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def create_json(path: Path, data: dict) -> bool:
    """Writes a JSON file only if none exists, atomically (a hard link of a complete file: of several
    processes creating it at once, exactly one succeeds). Returns whether this call created it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def settings_stamp(manifest: dict) -> str:
    """What every shard of an index must share: a digest of the settings (model fingerprint,
    output, parameters, sketch), engine, layout and sketch plan of its manifest."""
    key = {k: manifest[k] for k in ("settings", "engine", "d", "layout", "sketch_plan")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> dict | None:
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CorruptIndexError(f"{file} is not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise CorruptIndexError(f"{file} has format {manifest.get('format')!r}; this netsim reads format {FORMAT}")
    return manifest


def file_sha256(file: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _arrays(factors: list) -> dict[str, np.ndarray]:
    out = {}
    for i, f in enumerate(factors):
        if isinstance(f, DenseFactors):
            out[f"e{i}_grads"] = f.grads
        else:
            out[f"e{i}_x"], out[f"e{i}_delta"] = f.x, f.delta
    return {k: v.detach().cpu().contiguous().numpy() for k, v in out.items()}


def write_shard(root: Path, index: int, start: int, factors: list, stamp: str | None = None) -> dict:
    """Writes one shard (samples `[start, start + n)`) atomically; returns its meta (with the
    index's `stamp`, which a merge of shards written by independent workers checks)."""
    final = root / shard_name(index)
    tmp = root / f".{shard_name(index)}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for key, array in _arrays(factors).items():
        np.save(tmp / f"{key}.npy", array)
        files[f"{key}.npy"] = file_sha256(tmp / f"{key}.npy")
    n = (factors[0].grads if isinstance(factors[0], DenseFactors) else factors[0].delta).shape[0]
    meta = {"index": index, "start": start, "stop": start + n, "files": files, "stamp": stamp}
    write_json(tmp / "meta.json", meta)
    if final.exists():   # a shard another rank or an earlier attempt completed: keep the first
        shutil.rmtree(tmp)
        return json.loads((final / "meta.json").read_text())
    os.replace(tmp, final)
    return meta


def completed_shards(root: Path) -> list[dict]:
    """The metas of the complete shards, in shard order (temporary directories ignored)."""
    metas = []
    for folder in sorted(root.glob("shard_*")):
        meta = folder / "meta.json"
        if meta.exists():
            metas.append(json.loads(meta.read_text()))
    return metas


def remove_partial(root: Path, shards=None) -> None:
    """Removes the temporary directories and files a killed build left behind: all of them, or only
    those of the shard indices `shards` (the slice of one worker: the others may be writing theirs)."""
    names = None if shards is None else {shard_name(s) for s in shards}
    for tmp in root.glob(".*.tmp"):
        if names is not None and tmp.name[1:].split(".")[0] not in names:
            continue
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def verify_shard(root: Path, meta: dict) -> None:
    """Raises `CorruptIndexError` unless every file of the shard matches its checksum."""
    folder = root / shard_name(meta["index"])
    for name, digest in meta["files"].items():
        file = folder / name
        if not file.exists():
            raise CorruptIndexError(f"{file} is missing: the index is incomplete or damaged; rebuild that shard "
                                    "by deleting its directory and calling SimilarityIndex.build again")
        if file_sha256(file) != digest:
            raise CorruptIndexError(f"{file} does not match its SHA-256 recorded at build time: the shard is "
                                    "corrupt; delete its directory and call SimilarityIndex.build again to redo it")


def read_shard(root: Path, meta: dict, layout: list[dict], device) -> list:
    """The stored entries of one shard as layer-wise factors (memory-mapped, then on `device`)."""
    folder = root / shard_name(meta["index"])
    factors = []

    def load(key: str) -> torch.Tensor:
        return torch.from_numpy(np.load(folder / f"{key}.npy", mmap_mode="c")).to(device)

    for i, entry in enumerate(layout):
        names = tuple(entry["names"])
        if entry["type"] == "dense":
            factors.append(DenseFactors(load(f"e{i}_grads"), names))
        else:
            factors.append(LinearFactors(load(f"e{i}_x"), load(f"e{i}_delta"), entry["bias"], entry["weight"], names))
    return factors


def directory_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in Path(root).rglob("*") if f.is_file())
