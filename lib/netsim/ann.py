"""Approximate top-k search over a `SimilarityIndex`, through FAISS (the `ann` extra:
`pip install ./lib[ann]`, i.e. `faiss-cpu`; netsim imports it only here, only when asked to).

The (sketched) k^C of two indexed samples is an inner product of flat vectors: each sample's stored
entries normalised as the queries normalise them (K(x, x)^-1/2 / sqrt(rank)), flattened -- a Linear
layer's factored entry as the outer product of its output gradient and (input, 1). An inverted-file
index over those vectors with the inner-product metric (FAISS `IndexIVFScalarQuantizer`, 8-bit
scalar quantiser: one byte per value) proposes `candidates` samples per query, scanning `nprobe` of
its `nlist` lists; the candidates are then re-ranked by their k^C from the flat vectors of the
stored entries, so every returned value is the index's own k^C and only the candidate set is
approximate. Flat vectors longer than `MAX_DIM` are count-sketched to it (seeded) for the lists only
(a Linear layer stored exactly, or Kronecker-sketched, flattens to out x in values); the re-ranking
uses them whole.

On disk, beside the index (`<path>/ann/`): the trained quantiser, one sub-index per shard (written
atomically: a killed build resumes at the first missing one), their merge, and `meta.json` with the
settings and each shard's checksums. A shard rebuilt after its sub-index (other checksums) makes the
approximate index stale: `build` redoes that shard's part and the merge, and a query refuses a stale
one, saying so.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import store
from .layerwise import DenseFactors

#: Flat vectors longer than this are count-sketched to it (seeded) for the lists.
MAX_DIM = 1024
#: FAISS index description (`faiss.index_factory` form): inverted lists, 8-bit scalar quantiser.
INDEX_KIND = "IVF{nlist},SQ8"
#: Training vectors per list (FAISS warns below 39; k-means costs their number x nlist x D).
TRAIN_PER_LIST = 39
DIRECTORY = "ann"


def faiss_module():
    """`faiss`, or an ImportError that says which package to install."""
    try:
        import faiss
    except ImportError:
        raise ImportError("search='approximate' needs FAISS: pip install faiss-cpu (the netsim[ann] extra), or use "
                          "search='exact' (the streamed search, the default)") from None
    return faiss


def default_nlist(n: int) -> int:
    """Lists for n vectors: about 4 sqrt(n) (FAISS's guidance), at least 1, at most n / TRAIN_PER_LIST."""
    return max(1, min(int(4 * math.sqrt(n)), n // TRAIN_PER_LIST))


def flat(prepared: list) -> Tensor:
    """`(n, D)` flat vectors of prepared (normalised) entries: their plain dot products are the trace
    gram of the entries (`layerwise.gram(..., trace=True)`)."""
    parts = []
    for f in prepared:
        if isinstance(f, DenseFactors):
            parts.append(f.grads.reshape(f.grads.shape[0], -1))
            continue
        inputs = [f.x] if f.weight else []
        if f.bias:
            inputs.append(f.x.new_ones(f.x.shape[0], 1))
        x = torch.cat(inputs, 1)                                             # (n, in (+1))
        parts.append(torch.einsum("nao,ni->naoi", f.delta, x).reshape(x.shape[0], -1))
    return torch.cat(parts, 1)


def fingerprint(metas: list[dict]) -> str:
    """Digest of the shards (their ranges and files' checksums): what an approximate index was built from."""
    key = [(m["index"], m["start"], m["stop"], sorted(m["files"].items())) for m in metas]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


class ApproximateIndex:
    """The approximate index of one `SimilarityIndex` (built by `SimilarityIndex.build_ann`)."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta = root, meta
        self._index = None
        self._projection = None

    @property
    def path(self) -> Path:
        return self.root / DIRECTORY

    def projection(self, dim: int, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """(bucket, sign) `(dim,)` of the seeded count sketch to MAX_DIM when dim > MAX_DIM, else None."""
        if dim <= MAX_DIM:
            return None
        if self._projection is None:
            g = torch.Generator().manual_seed(self.meta["seed"])
            self._projection = (torch.randint(0, MAX_DIM, (dim,), generator=g),
                                torch.randint(0, 2, (dim,), generator=g).to(torch.float64) * 2 - 1)
        bucket, sign = self._projection
        return bucket.to(like.device), sign.to(like)

    def vectors(self, flat_vectors: Tensor) -> np.ndarray:
        """float32 contiguous `(n, min(D, MAX_DIM))` vectors of the lists."""
        projection = self.projection(flat_vectors.shape[1], flat_vectors)
        out = flat_vectors
        if projection is not None:
            bucket, sign = projection
            out = flat_vectors.new_zeros(len(flat_vectors), MAX_DIM).index_add_(1, bucket, flat_vectors * sign)
        return np.ascontiguousarray(out.detach().cpu().float().numpy())

    def index(self):
        if self._index is None:
            self._index = faiss_module().read_index(str(self.path / "index.faiss"))
        return self._index

    def search(self, flat_queries: Tensor, candidates: int, nprobe: int) -> Tensor:
        """`(Q, candidates)` indexed sample numbers proposed for each query (-1 where fewer exist)."""
        faiss = faiss_module()
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = self.index()
        index.nprobe = min(nprobe, index.nlist)
        _, ids = index.search(self.vectors(flat_queries), candidates)
        return torch.from_numpy(ids)


def build(index, *, nlist: int | None, seed: int, progress: bool) -> ApproximateIndex:
    """Builds (or resumes, or refreshes) the approximate index of `index` from its shards."""
    faiss = faiss_module()
    faiss.omp_set_num_threads(torch.get_num_threads())
    root, metas = index.path, index.manifest["shards"]
    folder = root / DIRECTORY
    folder.mkdir(exist_ok=True)
    store.remove_partial(folder)
    n = len(index)
    nlist = nlist or default_nlist(n)
    settings = {"nlist": nlist, "kind": INDEX_KIND.format(nlist=nlist), "seed": seed, "max_dim": MAX_DIM,
                "stamp": store.settings_stamp(index.manifest)}
    old = read_meta(root)
    if old is None or old["settings"] != settings:   # another layout or setting: start over
        for file in folder.glob("*.faiss"):
            file.unlink()
        old = None
    ann = ApproximateIndex(root, {"settings": settings, "seed": seed, "shards": {}})
    t0 = time.perf_counter()
    trained = folder / "trained.faiss"
    if not trained.exists():
        vectors = _training_vectors(index, ann, nlist * TRAIN_PER_LIST, seed)
        quantised = faiss.index_factory(vectors.shape[1], settings["kind"], faiss.METRIC_INNER_PRODUCT)
        quantised.train(vectors)
        _write(faiss, quantised, trained)
    shards = dict(old["shards"]) if old is not None else {}
    for meta in metas:   # one sub-index per shard, kept while the shard's checksums do not change
        key, part = str(meta["index"]), folder / f"{store.shard_name(meta['index'])}.faiss"
        if shards.get(key) == fingerprint([meta]) and part.exists():
            continue
        sub = faiss.read_index(str(trained))
        sub.add_with_ids(ann.vectors(flat(index._stored_prepared(index._read(meta)))),
                         np.arange(meta["start"], meta["stop"], dtype=np.int64))
        _write(faiss, sub, part)
        shards[key] = fingerprint([meta])
        store.write_json(folder / "meta.json", {"settings": settings, "seed": seed, "shards": shards})   # resumable
        if progress:
            print(f"approximate index: shard {meta['index'] + 1} of {len(metas)}", flush=True)
    merged = faiss.read_index(str(trained))
    for meta in metas:
        merged.merge_from(faiss.read_index(str(folder / f"{store.shard_name(meta['index'])}.faiss")), 0)
    _write(faiss, merged, folder / "index.faiss")
    ann.meta = {"settings": settings, "seed": seed, "shards": shards, "fingerprint": fingerprint(metas),
                "count": n, "build_wall_s": time.perf_counter() - t0}
    store.write_json(folder / "meta.json", ann.meta)
    return ann


def read_meta(root: Path) -> dict | None:
    file = root / DIRECTORY / "meta.json"
    return json.loads(file.read_text()) if file.exists() else None


def opened(index) -> ApproximateIndex:
    """The approximate index of `index`, checked against its shards.

    Raises:
        FileNotFoundError: none was built (`SimilarityIndex.build_ann`).
        ValueError: it is stale: built from other shards (one was rebuilt since) or other settings.
    """
    meta = read_meta(index.path)
    if meta is None or "fingerprint" not in meta:
        raise FileNotFoundError(f"no approximate index under {index.path / DIRECTORY}: call index.build_ann() first "
                                "(search='exact' needs none)")
    if meta["fingerprint"] != fingerprint(index.manifest["shards"]) or \
            meta["settings"]["stamp"] != store.settings_stamp(index.manifest):
        raise ValueError(f"the approximate index under {index.path / DIRECTORY} is older than the index's shards (a "
                         "shard was rebuilt since): call index.build_ann() to bring it up to date")
    return ApproximateIndex(index.path, meta)


def _training_vectors(index, ann: ApproximateIndex, count: int, seed: int) -> np.ndarray:
    """Up to `count` flat vectors drawn uniformly (seeded) from the shards."""
    n = len(index)
    picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    parts = []
    for meta in index.manifest["shards"]:
        rows = picked[(picked >= meta["start"]) & (picked < meta["stop"])] - meta["start"]
        if len(rows):
            rep = index._read(meta)
            parts.append(ann.vectors(flat(index._stored_prepared([f for f in _rows(rep, rows)]))))
    return np.concatenate(parts)


def _rows(rep: list, rows: Tensor) -> list:
    from .engine import LayerwiseEngine
    return LayerwiseEngine.map(rep, lambda t: t[rows])


def _write(faiss, faiss_index, path: Path) -> None:
    """Atomic write of a FAISS index file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    faiss.write_index(faiss_index, str(tmp))
    os.replace(tmp, path)
