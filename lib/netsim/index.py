"""`SimilarityIndex`: a data set's Jacobians stored once on disk, queried for kernels, neighbours and densities.

`SimilarityIndex.build` streams the data once and stores, per sample, the representation of its
Jacobian J(x) `(d, p)` that the kernels need, in the layer-wise form of `netsim.layerwise`:

- exact (`sketch=None`): each layer as the engine represents it -- a Linear layer as its two
  factors (input x and output gradients delta, in + d out values instead of d in out), other
  layers as their per-sample gradient block. Queries then equal `netsim.similarity` and
  `netsim.soft_density` (to rounding).
- sketched (`sketch=k`): a seeded random projection to about k values per sample and output row
  (`netsim.sketch`: Kronecker-structured for Linear layers, a tensor sketch of the per-token
  factors for layers over token positions, a count sketch for the rest). The
  normalisation of k^C is taken from the sketch itself (the cosine of the sketched Jacobians), so
  k^C(x, x) = 1 and |k^C| <= 1 still hold. `calibrate` measures its error against exact kernels.

The self-kernel normalisation K(x, x)^-1/2 is recomputed from the stored representation when a
shard is read (d^2 per stored value: 1/Q of the work of a block of Q queries).

On disk (`netsim.store`): a manifest (model fingerprint, output function, parameters, sketch
plan and seed, dtype, versions, sample count, completed shards with their checksums) and
memory-mapped shards of `shard_size` samples. A killed build resumes at the first incomplete
shard; `open` refuses a model whose parameters differ from the one the index was built from; a
shard whose files do not match their checksums raises `CorruptIndexError` when first read.

Every exact query streams over the shards in blocks: memory is one block of queries, one shard
and one `(queries, shard)` block, whatever the size of the index. `search="approximate"`
(`netsim.ann`, `build_ann`) asks an inverted-file index for candidates and re-ranks them by the
stored k^C; `refine` ranks a query's candidates by exact k^C recomputed from the data (for sketches
whose error exceeds the gaps between true neighbours). Independent workers (`build(num_shards=S,
shard_id=s)`) or `torch.distributed` ranks write one index's shards together.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, ann, store
from .by_module import jacobian_layout, layerwise_layout, module_of, parameter_modules
from .checks import check_choice, check_data, check_model, check_positive_int, model_device
from .data import as_source
from .density import soft_normaliser
from .engine import LayerwiseEngine, check_engine_options
from .grads import OutputFn, trainable_parameters
from .kernel import (
    KINDS,
    ON_ZERO,
    data_output_dim,
    engine_chunks,
    engine_for_data,
    left_factor,
    prepare_columns,
    prepare_rows,
    trace_divisor,
)
from .layerwise import DenseFactors
from .memory import budget_bytes, check_budget
from .params import ParamSpec
from .sketch import Sketch, plan_sketch

#: The query searches: the streamed comparison with every indexed sample, or `netsim.ann`'s.
SEARCHES = ("exact", "approximate")
#: Queries whose candidates an approximate search re-ranks at a time (bounds the (queries,
#: candidates, D) gather).
RERANK_QUERIES = 128
#: A sketch size that keeps the neighbours (top-10 recall against exact k^C, `bench/index.py`).
DEFAULT_SKETCH = 1024

Rep = list  # a chunk's entries: LinearFactors / DenseFactors
ENGINE = LayerwiseEngine  # the kernel operations on stored entries (static methods)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class, parameter and buffer names, shapes, dtypes and values."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            t = t.detach().cpu().contiguous()
            h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def describe_function(fn) -> str | None:
    """A stable description of an output function (module and qualified name; partials spelled out)."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        args = ", ".join([describe_function(fn.func), *map(repr, fn.args),
                          *(f"{k}={v!r}" for k, v in sorted(fn.keywords.items()))])
        return f"partial({args})"
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    return f"{getattr(fn, '__module__', type(fn).__module__)}.{name}"


def _entries(rep, model: nn.Module, params: ParamSpec) -> Rep:
    """A chunk of an engine's representation as layer-wise entries of one module each (the Jacobian
    engine's `(n, d, p)` is cut into its modules' column blocks)."""
    if isinstance(rep, list):
        return rep
    names = parameter_modules(model, params)
    return [DenseFactors(rep[:, :, cols], tuple(names[m])) for m, cols in jacobian_layout(model, params).items()]


def _entry_layout(rep: Rep) -> list[dict]:
    return [{"type": "dense", "names": list(f.names)} if isinstance(f, DenseFactors) else
            {"type": "linear", "names": list(f.names), "bias": f.bias, "weight": f.weight} for f in rep]


class SimilarityIndex:
    """An on-disk index of a data set's Jacobians (see the module docstring). Build with `build`,
    reopen with `open`; `len(index)` is the number of indexed samples."""

    def __init__(self, root: Path, manifest: dict, model: nn.Module, output_fn: OutputFn | None,
                 params: ParamSpec, chunk_size: int | None, memory_budget: int | None = None):
        self.path, self.manifest, self.model = Path(root), manifest, model
        self.output_fn, self.params, self.chunk_size = output_fn, params, chunk_size
        self.memory_budget = memory_budget   # of the queries' blocks (`netsim.memory`)
        self._ann = None                      # the approximate index, opened at its first use
        self._sketch = Sketch(manifest["sketch_plan"]) if manifest["sketch_plan"] else None
        self._verified: set[int] = set()   # shards whose checksums this object has checked (or written)

    # ------------------------------------------------------------------ building and opening
    @classmethod
    def build(cls, model: nn.Module, data, path, *, output_fn: OutputFn | None = None, targets: Tensor | None = None,
              targets_key: str | None = None, params: ParamSpec = None, sketch: int | None = None, seed: int = 0,
              shard_size: int = 4096, method: str = "auto", chunk_size: int | None = None, on_zero: str = "raise",
              progress: bool = False, process_group=None, num_shards: int | None = None, shard_id: int | None = None,
              memory_budget: int | None = None) -> SimilarityIndex | None:
        """Streams `data` once and stores what the kernels need of every sample under `path`.

        If `path` already holds an index built with the same settings, a complete one is reopened
        and a partial one (a killed build) resumes at its first incomplete shard; an index built
        with other settings (another model, output function, parameters, sketch) is refused,
        never overwritten.

        Independent workers (a SLURM array, `torchrun`, Ray tasks, shells on one machine) build one
        index together with `num_shards=S, shard_id=s`: each passes the same data, path and settings
        and writes its slice, the s-th of S contiguous runs of shards, publishing each shard
        atomically; nothing is shared but the file system. The first worker to start writes the
        manifest (the others adopt it and are refused if their settings differ); each shard
        carries its settings' stamp; a killed worker resumes its own slice. The worker that finds
        every slice written completes the index (`merge`; workers finishing together may both do it,
        harmlessly); the others return None.

        Args:
            model: the trained network (eval mode).
            data: any data form of `netsim.data` (tensor, Dataset, DataLoader, iterable of batches),
                read once (and its first samples once more for the layout).
            path: a directory (created).
            output_fn, targets, targets_key, params, method, chunk_size, on_zero: as in
                `netsim.similarity` (targets: one row per sample, for `output_fn(out, targets)`).
            sketch: None (exact) or k, the stored values per sample and output row of a seeded
                random projection (`netsim.sketch`).
            seed: the projections' seed (recorded in the manifest).
            shard_size: samples per shard (the unit of resumption and of reading).
            progress: a tqdm bar over the samples.
            process_group: a `torch.distributed` group: every rank passes the same data and path
                (a shared file system) and writes the shards `s` with `s % world == rank`; the data
                must have a known length.
            num_shards, shard_id: this process builds slice `shard_id` (0-based) of `num_shards`
                (see above); the data must have a known length (a tensor or a Dataset is read at the
                slice directly, a DataLoader up to it).
            memory_budget: bytes the queries of the returned index may hold beyond the model: their
                block of entries and its kernel block against a shard (`netsim.memory`; also an
                argument of `open`).

        Returns:
            The index; None for a worker (`num_shards`) while other slices are missing.

        Raises:
            FileExistsError: `path` holds an index with other settings (or is a file).
            ZeroGradientError, NonFiniteError: as in `netsim.similarity`.
        """
        check_engine_options(model, method=method, chunk_size=chunk_size, params=params, memory_budget=memory_budget)
        worker = _check_worker(num_shards, shard_id, process_group)
        check_positive_int("shard_size", shard_size)
        check_choice("on_zero", on_zero, ON_ZERO)
        if sketch is not None and (isinstance(sketch, bool) or not isinstance(sketch, int) or sketch < 1):
            raise ValueError(f"sketch must be None (exact) or a positive int, got {sketch!r}")
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        source = as_source(data, targets, targets_key=targets_key, name="data", device=model_device(model))
        check_data(model, source)
        distributed = process_group is not None
        if (distributed or worker) and source.length is None:
            raise ValueError("process_group and num_shards need data of known length (a tensor, a Dataset or a "
                             "DataLoader over one)")
        settings = cls._settings(model, output_fn, params, sketch, seed, shard_size, on_zero)
        rank = dist.get_rank(process_group) if distributed else 0
        manifest = store.read_manifest(root)
        if manifest is None and rank == 0:   # the first to create it wins; a worker that loses reads it
            new = cls._new_manifest(model, source, settings, output_fn, chunk_size, method, params)
            new.update(length=source.length, num_shards=num_shards)
            root.mkdir(parents=True, exist_ok=True)
            manifest = new if store.create_json(root / store.MANIFEST, new) else store.read_manifest(root)
        if distributed:
            dist.barrier(process_group)
            manifest = store.read_manifest(root)
        cls._check_settings(manifest, settings, root)
        if method != "auto" and method != manifest["engine"]:
            raise FileExistsError(f"{root} was built with method={manifest['engine']!r}, not {method!r}")
        index = cls(root, manifest, model, output_fn, params, chunk_size, memory_budget)
        if manifest["complete"]:
            return index
        _check_same_build(root, manifest, num_shards, source.length)
        count = math.ceil(source.length / shard_size) if source.length is not None else None
        mine = (None if not (distributed or worker) else
                _slice_of(shard_id, num_shards, count) if worker else
                range(rank, count, dist.get_world_size(process_group)))
        if rank == 0 or worker:   # a worker's slice only: the others may be writing theirs
            store.remove_partial(root, mine if worker else None)
        if distributed:
            dist.barrier(process_group)
        index._write_shards(source, progress, mine)
        if distributed:
            dist.barrier(process_group)
        if worker:
            return cls._merged(index) if _missing(root, manifest) == [] else None
        if rank == 0:
            index._finish(source)
        if distributed:
            dist.barrier(process_group)
            index.manifest = store.read_manifest(root)
        return index

    @staticmethod
    def _settings(model, output_fn, params, sketch, seed, shard_size, on_zero) -> dict:
        first = next(iter(trainable_parameters(model, params).values()))
        return {"fingerprint": model_fingerprint(model), "output_fn": describe_function(output_fn),
                "parameters": list(trainable_parameters(model, params)), "sketch": sketch,
                "seed": seed if sketch is not None else None, "dtype": str(first.dtype).replace("torch.", ""),
                "shard_size": shard_size, "on_zero": on_zero}

    @staticmethod
    def _check_settings(manifest: dict, settings: dict, root: Path) -> None:
        differ = [k for k in settings if manifest["settings"].get(k) != settings[k]]
        if differ:
            details = "; ".join(f"{k}: index {manifest['settings'].get(k)!r}, now {settings[k]!r}"
                                for k in differ if k not in ("fingerprint", "parameters"))
            if "fingerprint" in differ:
                details = "the model's parameters or buffers differ (another model, or it was trained further)" + (
                    f"; {details}" if details else "")
            if "parameters" in differ:
                details += "; the selected parameters differ"
            raise FileExistsError(f"{root} holds an index built with other settings ({details.strip('; ')}). "
                                  "Use another path, or delete that directory to rebuild it.")

    @classmethod
    def _new_manifest(cls, model, source, settings, output_fn, chunk_size, method, params) -> dict:
        sketched = settings["sketch"] is not None
        engine = engine_for_data(model, source, output_fn, chunk_size, method, params, measure=not sketched)
        d = data_output_dim(model, source, output_fn)
        inputs, targets = source.first(engine.chunk)
        engine.tokens = sketched
        rep = _entries(next(engine.chunks(inputs, targets))[1], model, params)
        plan = None if settings["sketch"] is None else plan_sketch(rep, settings["sketch"], settings["seed"])
        stored = rep if plan is None else Sketch(plan).apply(rep)
        return {"format": store.FORMAT, "settings": settings, "engine": engine.name, "d": d,
                "layout": _entry_layout(stored), "sketch_plan": plan, "values_per_sample": _values_per_sample(stored),
                "versions": {"netsim": __version__, "torch": torch.__version__, "numpy": np.__version__},
                "count": None, "complete": False, "shards": [], "calibration": None, "build_wall_s": 0.0}

    @classmethod
    def open(cls, path, model: nn.Module, *, output_fn: OutputFn | None = None, params: ParamSpec = None,
             chunk_size: int | None = None, memory_budget: int | None = None) -> SimilarityIndex:
        """Reopens a complete index for `model` (the same output function and parameter selection).

        An index written by independent workers (`build(num_shards=...)`) is completed here when
        every slice is present (`merge`).

        Raises:
            FileNotFoundError: no index at `path`.
            ValueError: the index is incomplete (call `build` again to resume it; for workers, the
                missing slices and shards are named), a shard was written with other settings (named),
                or the index was built from another model (its parameter fingerprint differs), output
                function or parameter selection.
            CorruptIndexError: an unreadable manifest.
        """
        check_model(model)
        check_budget(memory_budget)
        root = Path(path)
        manifest = store.read_manifest(root)
        if manifest is None:
            raise FileNotFoundError(f"no SimilarityIndex at {root} (no {store.MANIFEST})")
        if not manifest["complete"] and manifest.get("num_shards") is not None:   # written by workers: merge
            manifest = _finalise(root, manifest, manifest["length"])
        if not manifest["complete"]:
            raise ValueError(f"the index at {root} is incomplete ({len(manifest['shards'])} shard(s) done): call "
                             "SimilarityIndex.build with the same arguments to resume it")
        saved = manifest["settings"]
        now = cls._settings(model, output_fn, params, saved["sketch"], saved["seed"], saved["shard_size"],
                            saved["on_zero"])
        try:
            cls._check_settings(manifest, now, root)
        except FileExistsError as error:
            raise ValueError(f"this model does not match the index: {error}") from None
        return cls(root, manifest, model, output_fn, params, chunk_size, memory_budget)

    @classmethod
    def merge(cls, path, model: nn.Module, **options) -> SimilarityIndex:
        """Completes an index written by independent workers (`build(num_shards=S, shard_id=s)`) and
        opens it: checks that every slice is present and that every shard carries the index's
        settings stamp, naming the missing slices (and their shards and samples) or the shard that
        differs. The same as `open(path, model, **options)`, which merges too."""
        return cls.open(path, model, **options)

    @classmethod
    def _merged(cls, index: SimilarityIndex) -> SimilarityIndex:
        return cls.open(index.path, index.model, output_fn=index.output_fn, params=index.params,
                        chunk_size=index.chunk_size, memory_budget=index.memory_budget)

    def _write_shards(self, source, progress: bool, shards=None) -> None:
        """Writes the missing shards: all of them in order (`shards` None; the manifest records each),
        or those of `shards` (one rank's or worker's; only the files say which are done)."""
        size = self.manifest["settings"]["shard_size"]
        done = {m["index"]: m for m in store.completed_shards(self.path)}
        self._clock = (time.perf_counter(), self.manifest.get("build_wall_s", 0.0))
        engine = self._engine(source)
        stamp = store.settings_stamp(self.manifest)
        bar = tqdm(total=source.length if shards is None else len(shards) * size, desc="index", unit="sample",
                   disable=not progress)
        try:
            if shards is None:
                start = 0
                while start // size in done:   # the complete prefix (shards are written in order)
                    start = done[start // size]["stop"]
                bar.update(start)
                chunks = engine_chunks(engine, source, start, block=size)
                for s, group in groupby(chunks, key=lambda chunk: chunk[0] // size):
                    reps = []
                    for offset, rep in group:
                        reps.append(self._stored(rep, offset))
                        bar.update(ENGINE.size(reps[-1]))
                    self._add_shard(store.write_shard(self.path, s, s * size, ENGINE.cat(reps), stamp))
                return
            for s in shards:
                stop = min(source.length, (s + 1) * size)
                if s not in done:
                    reps = [self._stored(rep, s * size + o) for o, rep in
                            engine_chunks(engine, source.rows(s * size, stop))]
                    store.write_shard(self.path, s, s * size, ENGINE.cat(reps), stamp)
                bar.update(stop - s * size)
        finally:
            bar.close()

    def _stored(self, rep, offset: int) -> Rep:
        """A chunk as it is stored: split by module, sketched, checked for zero (sketched) gradients."""
        rep = _entries(rep, self.model, self.params)
        rep = self._sketch.apply(rep) if self._sketch is not None else rep
        left_factor(rep, "correlation", None, self.manifest["settings"]["on_zero"], offset, ENGINE)
        return rep

    def _elapsed(self) -> float:
        """Wall seconds spent building, over every (resumed) attempt so far."""
        start, before = self._clock
        return before + time.perf_counter() - start

    def _add_shard(self, meta: dict) -> None:
        self._verified.add(meta["index"])
        self.manifest["build_wall_s"] = self._elapsed()
        self.manifest["shards"] = sorted([*(m for m in self.manifest["shards"] if m["index"] != meta["index"]), meta],
                                         key=lambda m: m["index"])
        store.write_json(self.path / store.MANIFEST, self.manifest)

    def _finish(self, source) -> None:
        self.manifest["build_wall_s"] = self._elapsed()
        self.manifest = _finalise(self.path, self.manifest, source.length)

    # ------------------------------------------------------------------ representations
    def _engine(self, source):
        engine = engine_for_data(self.model, source, self.output_fn, self.chunk_size, self.manifest["engine"],
                                 self.params)
        sketch = self.manifest["sketch_plan"]   # token maps sketched from per-token factors (older indexes: formed)
        engine.tokens = sketch is not None and any(e["kind"] == "tensor" for e in sketch["entries"])
        return engine

    def _query_reps(self, xs, targets, targets_key, block: int | None = None) -> Iterator[tuple[int, Rep]]:
        """`(offset, stored-like representation)` of query data, chunk by chunk (checked like the
        index's layout)."""
        source = as_source(xs, targets, targets_key=targets_key, name="xs", device=model_device(self.model))
        check_data(self.model, source)
        engine = self._engine(source)
        for offset, rep in engine_chunks(engine, source, block=block):
            rep = _entries(rep, self.model, self.params)
            rep = self._sketch.apply(rep) if self._sketch is not None else rep
            if _entry_layout(rep) != self.manifest["layout"]:
                raise ValueError("the queries' layer layout differs from the index's: not the same model structure")
            yield offset, rep

    def _shards(self) -> Iterator[tuple[dict, Rep]]:
        for meta in self.manifest["shards"]:
            yield meta, self._read(meta)

    def _read(self, meta: dict) -> Rep:
        if meta["index"] not in self._verified:
            store.verify_shard(self.path, meta)
            self._verified.add(meta["index"])
        return store.read_shard(self.path, meta, self.manifest["layout"], model_device(self.model))

    def _rows(self, indices) -> Rep:
        """The stored entries of the samples at `indices` (global row numbers, a list or tensor), in that
        order: each shard holding some of them is read once."""
        indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        bad = indices[(indices < 0) | (indices >= len(self))]
        if len(bad):
            raise IndexError(f"sample {int(bad[0])} is not in the index (0..{len(self) - 1})")
        ordered, back = indices.sort()
        reps = []
        for meta in self.manifest["shards"]:
            inside = ordered[(ordered >= meta["start"]) & (ordered < meta["stop"])] - meta["start"]
            if len(inside):
                reps.append(ENGINE.map(self._read(meta), lambda t, rows=inside: t[rows]))
        out = ENGINE.cat(reps)
        return ENGINE.map(out, lambda t: t[back.argsort()])

    def _prepared(self, chunks, kind: str, side: str) -> Rep:
        """Prepared entries (`kernel.prepare_rows` / `prepare_columns`) divided per sample by the
        reduction's divisor (`kernel.trace_divisor`), so that a plain trace gram is the reduced
        kernel: no element-wise pass over the `(rows, columns)` blocks. Zero-gradient samples
        (on_zero="zero") become zero rows."""
        on_zero = self.manifest["settings"]["on_zero"]
        chunks = list(chunks)
        if side == "rows":
            Q, rank = prepare_rows(chunks, ENGINE, kind, None, on_zero, chunks[0][0])
        else:
            (offset, rep), = chunks
            Q, rank = prepare_columns(rep, kind, None, on_zero, offset, ENGINE)
        divisor = trace_divisor(kind, rank, side)
        scale = torch.where(divisor > 0, 1.0 / divisor.clamp_min(1.0), torch.zeros_like(divisor))
        if bool((scale == 1).all()):
            return Q
        d = self.manifest["d"]
        first = Q[0].grads if isinstance(Q[0], DenseFactors) else Q[0].delta
        left = torch.eye(d, dtype=first.dtype, device=first.device) * scale.to(first)[:, None, None]
        return ENGINE.transform(Q, left)

    def _kernel(self, Qx: Rep, Qy: Rep, kind: str) -> Tensor:
        """The reduced kernel block between two `_prepared` sides."""
        block = ENGINE.gram(Qx, Qy, True)
        return block.clamp_(-1.0, 1.0) if kind == "correlation" else block

    # ------------------------------------------------------------------ approximate search
    def build_ann(self, *, nlist: int | None = None, seed: int = 0, progress: bool = False):
        """Builds the approximate index of `query(search="approximate")` beside this index (`netsim.ann`):
        an inverted-file index of `nlist` lists (default about 4 sqrt(N)) over the normalised stored
        entries, one part per shard. Resumes a killed build; after a shard was rebuilt, redoes its part.

        Returns:
            The `netsim.ann.ApproximateIndex` (its `meta` holds the settings and build time).

        Raises:
            ImportError: FAISS is not installed (`pip install faiss-cpu`).
        """
        if nlist is not None:
            check_positive_int("nlist", nlist)
        self._ann = ann.build(self, nlist=nlist, seed=seed, progress=progress)
        return self._ann

    def calibrate_ann(self, n_queries: int = 200, k: int = 10, *, nprobe: int | None = None,
                      candidates: int | None = None, seed: int = 0) -> dict:
        """Top-k recall of the approximate search against the exact streamed search, for
        `n_queries` indexed samples drawn at random (seeded) as queries (self excluded from both).

        Returns:
            `{"ann_recall_at_k", "ann_k", "ann_queries", "ann_nprobe", "ann_candidates"}`.
        """
        check_positive_int("n_queries", n_queries)
        k = min(k, len(self) - 1)   # self excluded
        picked = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n_queries].sort().values
        queries = ann.flat(self._stored_prepared(self._rows(picked.tolist())))
        nprobe, candidates = self._search_settings(k, nprobe, candidates)
        _, approximate = self._approximate(queries, k, nprobe, candidates, exclude=picked)
        picked = picked.to(queries.device)
        best = queries.new_full((len(picked), k), -math.inf)
        found = torch.full((len(picked), k), -1, device=queries.device)
        for meta in self.manifest["shards"]:   # the exact search, streamed over the shards
            block = queries @ ann.flat(self._stored_prepared(self._read(meta))).T
            columns = torch.arange(meta["start"], meta["stop"], device=queries.device)
            block[picked[:, None] == columns[None, :]] = -math.inf
            _merge_top(best, found, block, meta["start"])
        hits = sum(len((set(a.tolist()) & set(b.tolist())) - {-1}) for a, b in zip(found, approximate))
        return {"ann_recall_at_k": hits / found.numel(), "ann_k": k, "ann_queries": len(picked),
                "ann_nprobe": nprobe, "ann_candidates": candidates}

    def _search_settings(self, k: int, nprobe: int | None, candidates: int | None) -> tuple[int, int]:
        """The approximate search's nprobe and candidates, their defaults filled in (checked)."""
        check_positive_int("nprobe", nprobe, optional=True)
        check_positive_int("candidates", candidates, optional=True)
        if candidates is not None and candidates < k:
            raise ValueError(f"candidates ({candidates}) must be at least k ({k}): they are re-ranked to the top k")
        if self._ann is None:
            self._ann = ann.opened(self)
        return nprobe or default_nprobe(self._ann.meta["settings"]["nlist"]), candidates or max(4 * k, 100)

    def _stored_prepared(self, rep: Rep) -> Rep:
        """Stored entries normalised for k^C (`_prepared`, rows and columns alike for correlation)."""
        return self._prepared([(0, rep)], "correlation", "rows")

    def _query_flat(self, xs, targets, targets_key) -> Tensor:
        """`(Q, D)` flat vectors of query data (`netsim.ann.flat`)."""
        reps = self._query_reps(xs, targets, targets_key)
        return torch.cat([ann.flat(self._stored_prepared(rep)) for _, rep in reps])

    def _approximate(self, queries: Tensor, k: int, nprobe: int | None, candidates: int | None,
                     exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`(Q, k)` top-k of flat query vectors from the approximate index's candidates, re-ranked by
        the stored k^C (`exclude`: each query's own sample number, left out)."""
        nprobe, candidates = self._search_settings(k, nprobe, candidates)
        proposed = self._ann.search(queries, candidates + (exclude is not None), nprobe).to(queries.device)
        if exclude is not None:
            proposed[proposed == exclude.to(proposed.device)[:, None]] = -1
        scores = queries.new_full(proposed.shape, -math.inf)
        wanted = proposed[proposed >= 0].unique()
        if len(wanted):
            vectors = ann.flat(self._stored_prepared(self._rows(wanted)))       # (U, D), in `wanted` order
            position = torch.searchsorted(wanted, proposed.clamp_min(0))
            gathered = proposed.shape[1] * vectors.shape[1] * vectors.element_size()   # bytes per query
            rows = max(1, min(RERANK_QUERIES, budget_bytes(self.memory_budget) // gathered))
            for start in range(0, len(queries), rows):   # (queries, candidates, D) a block at a time
                block = slice(start, start + rows)
                exact = torch.einsum("qd,qcd->qc", queries[block], vectors[position[block]])
                scores[block] = torch.where(proposed[block] >= 0, exact, scores[block])
        values, order = scores.clamp_(max=1.0).topk(min(k, scores.shape[1]), dim=1)
        return values, torch.where(torch.isfinite(values), proposed.gather(1, order), -1)

    def _rows_per_block(self) -> int:
        """Queries per block: their entries, their kernel block against a shard and its top-k merge
        (two values per shard sample), and the shard read fit the memory budget."""
        itemsize = torch.empty(0, dtype=getattr(torch, self.manifest["settings"]["dtype"])).element_size()
        per_sample = self.manifest["values_per_sample"] * itemsize
        shard_size = self.manifest["settings"]["shard_size"]
        free = budget_bytes(self.memory_budget) - shard_size * per_sample
        return max(1, min(free // (per_sample + 2 * shard_size * itemsize), shard_size))

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return int(self.manifest["count"] or 0)

    @property
    def nbytes(self) -> int:
        """Bytes on disk."""
        return store.directory_bytes(self.path)

    def __repr__(self) -> str:
        mode = "exact" if self.manifest["sketch_plan"] is None else f"sketch={self.manifest['settings']['sketch']}"
        return f"SimilarityIndex({str(self.path)!r}, {len(self)} samples, d={self.manifest['d']}, {mode})"

    def verify(self) -> None:
        """Checks every shard against its checksums (raises `CorruptIndexError`)."""
        for meta in self.manifest["shards"]:
            store.verify_shard(self.path, meta)
            self._verified.add(meta["index"])

    def _module_entries(self, modules) -> list[int] | None:
        """The positions of the stored entries of `modules` (names as in `named_modules`), None for all."""
        if modules is None:
            return None
        modules = [modules] if isinstance(modules, str) else list(modules)
        owners = [{module_of(name) for name in entry["names"]} for entry in self.manifest["layout"]]
        available = sorted(set().union(*owners))
        unknown = [m for m in modules if m not in available]
        if unknown or not modules:
            raise ValueError(f"modules must name modules owning indexed parameters; {unknown or modules} are not "
                             f"among them: {available}")
        return [i for i, names in enumerate(owners) if names & set(modules)]

    def _blocks(self, xs, targets, targets_key, kind: str, modules=None) -> Iterator[tuple[slice, dict, Tensor]]:
        """`(query rows, shard meta, (b, shard) kernel block)` for every query block and shard (of the
        entries of `modules` only, when given)."""
        check_choice("kind", kind, KINDS)
        keep = self._module_entries(modules)
        pick = (lambda rep: rep) if keep is None else (lambda rep: [rep[i] for i in keep])
        block = self._rows_per_block()
        chunks = ((offset, pick(rep)) for offset, rep in self._query_reps(xs, targets, targets_key, block=block))
        for _, group in groupby(chunks, key=lambda chunk: chunk[0] // block):
            group = list(group)
            Qx = self._prepared(group, kind, "rows")
            rows = slice(group[0][0], group[0][0] + ENGINE.size(Qx))
            for meta, rep in self._shards():
                Qy = self._prepared([(meta["start"], pick(rep))], kind, "columns")
                yield rows, meta, self._kernel(Qx, Qy, kind)

    def similarity(self, xs, *, kind: str = "correlation", targets: Tensor | None = None,
                   targets_key: str | None = None, modules=None) -> Tensor:
        """The kernel rows of query inputs against every indexed sample.

        Args:
            xs: `(Q, ...)` queries, any data form of `netsim.data` (read once).
            kind: "correlation" (k^C), "inner" (k^I) or "influence" (k^N: entry [q, j] is the
                influence of query q on indexed sample j), reduced by the trace.
            targets, targets_key: the queries' targets for the output function.
            modules: a module name or names (as in `model.named_modules()`): the kernel of those
                modules' parameters alone (normalised by their own self-kernels: what
                `netsim.similarity(..., params=[f"{module}.*"])` gives), from their stored entries.
                None: every indexed parameter.

        Returns:
            `(Q, N)`: equal to `netsim.similarity(model, xs, indexed data, kind=kind)` for an exact index.
        """
        rows_out = []
        for rows, meta, block in self._blocks(xs, targets, targets_key, kind, modules):
            if meta["index"] == 0:
                rows_out.append(block.new_empty(rows.stop - rows.start, len(self)))
            rows_out[-1][:, meta["start"]:meta["stop"]] = block
        return torch.cat(rows_out)

    def query(self, xs, k: int = 10, *, kind: str = "correlation", targets: Tensor | None = None,
              targets_key: str | None = None, modules=None, search: str = "exact", nprobe: int | None = None,
              candidates: int | None = None) -> tuple[Tensor, Tensor]:
        """The k most similar indexed samples of each query, streamed (no `(Q, N)` matrix).

        Args:
            xs, kind, targets, targets_key, modules: as in `similarity` (e.g. the top-k under the
                k^C of some modules only).
            search: "exact" (every indexed sample compared, streamed over the shards: the
                reference) or "approximate" (k^C only, all modules: the approximate index of
                `build_ann` proposes `candidates` samples per query from `nprobe` of its lists, and
                they are re-ranked by their stored k^C; `netsim.ann`; `refine` ranks by exact k^C).
            nprobe, candidates: of the approximate search (defaults: `default_nprobe(nlist)`,
                max(4 k, 100)); more of either finds more of the exact top k, in more time.

        Returns:
            `(values, indices)`, both `(Q, k)`, by decreasing similarity (k is capped at N; an
            approximate search that finds fewer than k candidates pads with -inf and -1).
        """
        check_positive_int("k", k)
        check_choice("search", search, SEARCHES)
        k = min(k, len(self))
        if search == "approximate":
            if kind != "correlation" or modules is not None:
                raise ValueError("search='approximate' ranks by the full k^C (kind='correlation', modules=None); "
                                 "use search='exact' for the other kernels and for some modules only")
            return self._approximate(self._query_flat(xs, targets, targets_key), k, nprobe, candidates)
        values, indices = [], []
        for rows, meta, block in self._blocks(xs, targets, targets_key, kind, modules):
            if meta["index"] == 0:
                values.append(block.new_full((rows.stop - rows.start, k), -math.inf))
                indices.append(torch.full((rows.stop - rows.start, k), -1, dtype=torch.long, device=block.device))
            _merge_top(values[-1], indices[-1], block, meta["start"])
        return torch.cat(values), torch.cat(indices)

    def refine(self, xs, data, k: int = 10, *, candidates: int | None = None, targets: Tensor | None = None,
               data_targets: Tensor | None = None, targets_key: str | None = None, search: str = "exact",
               nprobe: int | None = None) -> tuple[Tensor, Tensor]:
        """The exact top k under k^C among each query's `candidates` best indexed samples.

        A sketched index ranks by an estimate of k^C; where a model's neighbourhoods are flat (true
        k^C of the nearest samples barely above the rest) the sketch's error reorders them. `refine`
        proposes `candidates` samples per query by the stored k^C (`query` with `search` and
        `nprobe`), recomputes their Jacobians from `data` and ranks them by exact k^C: the true top
        k whenever the proposals hold it, at the cost of one Jacobian per distinct proposal.

        Args:
            xs, targets, targets_key, search, nprobe: as in `query` (xs read once per block of
                queries, plus once for the proposals).
            data: the data the index was built from, in the same order (as in `calibrate`).
            candidates: proposals per query (default max(10 k, 100); at least k).
            data_targets: `data`'s targets for the output function (one row per sample).

        Returns:
            `(values, indices)`, both `(Q, k)`: exact k^C by decreasing value (as
            `netsim.similarity(model, xs, data)` gives them).
        """
        check_positive_int("k", k)
        check_positive_int("candidates", candidates, optional=True)
        k = min(k, len(self))
        candidates = min(len(self), max(10 * k, 100) if candidates is None else candidates)
        if candidates < k:
            raise ValueError(f"candidates ({candidates}) must be at least k ({k}): they are ranked to the top k")
        queries = as_source(xs, targets, targets_key=targets_key, name="xs", device=model_device(self.model))
        source = self._indexed_data(data, data_targets, targets_key, "data_targets")
        # blocks of b queries whose (b, distinct proposals <= b candidates) exact rows fit the budget
        per_block = max(1, math.isqrt(budget_bytes(self.memory_budget) // (4 * candidates)))
        queries.require_passes(2, "refine")   # the proposals, then the exact rows
        _, proposed = self.query(queries, candidates, targets_key=targets_key, search=search, nprobe=nprobe)
        blocks = range(0, len(proposed), per_block)
        source.require_passes(len(blocks), "refine")
        values, indices = [], []
        for start in blocks:
            block = proposed[start:start + per_block]
            wanted = block[block >= 0].unique()
            if len(wanted) == 0:   # an approximate search that proposed nothing for this block
                values.append(torch.full((len(block), k), -math.inf))
                indices.append(torch.full((len(block), k), -1))
                continue
            exact = self._exact_kc(queries.rows(start, start + len(block)), source.select(wanted),
                                   memory_budget=self.memory_budget)
            scores = exact.gather(1, torch.searchsorted(wanted, block.clamp_min(0)).to(exact.device))
            scores = scores.masked_fill((block < 0).to(exact.device), -math.inf)
            top, order = scores.topk(k, dim=1)
            values.append(top)
            indices.append(torch.where(torch.isfinite(top), block.to(exact.device).gather(1, order), -1))
        return torch.cat(values), torch.cat(indices)

    def neighbours(self, k: int = 10, *, kind: str = "correlation", progress: bool = False, search: str = "exact",
                   nprobe: int | None = None, candidates: int | None = None) -> tuple[Tensor, Tensor]:
        """The k most similar other indexed samples of every indexed sample (self excluded).

        For the symmetric kinds each pair of shards is compared once (the upper triangle): O(N^2).
        `search="approximate"` (k^C only) asks the approximate index for each sample instead, as
        `query` does: O(N nprobe N / nlist).

        Returns:
            `(values, indices)`, both `(N, k)`, by decreasing similarity (k capped at N - 1).
        """
        check_choice("kind", kind, KINDS)
        check_positive_int("k", k)
        check_choice("search", search, SEARCHES)
        k = min(k, len(self) - 1)
        if k < 1:
            raise ValueError("neighbours needs at least two indexed samples")
        if search == "approximate":
            if kind != "correlation":
                raise ValueError("search='approximate' ranks by k^C (kind='correlation')")
            parts = [self._approximate(ann.flat(self._stored_prepared(self._read(meta))), k, nprobe, candidates,
                                       exclude=torch.arange(meta["start"], meta["stop"]))
                     for meta in tqdm(self.manifest["shards"], desc="neighbours (approximate)", unit="shard",
                                      disable=not progress)]
            return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])
        shards = self.manifest["shards"]
        values = None
        indices = torch.full((len(self), k), -1, dtype=torch.long)
        bar = tqdm(total=len(shards), desc=f"neighbours k^{kind}", unit="shard", disable=not progress)
        symmetric = kind != "influence"
        for a, meta_a in enumerate(shards):
            Qa = self._prepared([(meta_a["start"], self._read(meta_a))], kind, "rows")
            rows_a = slice(meta_a["start"], meta_a["stop"])
            for meta_b in shards[a if symmetric else 0:]:
                rows_b = slice(meta_b["start"], meta_b["stop"])
                # the two sides differ but for correlation (k^I divides its rows by d, not its columns)
                Qb = Qa if meta_b is meta_a and kind == "correlation" else \
                    self._prepared([(meta_b["start"], self._read(meta_b))], kind, "columns")
                block = self._kernel(Qa, Qb, kind)
                if values is None:
                    values = block.new_full((len(self), k), -math.inf)
                    indices = indices.to(block.device)
                if meta_b is meta_a:
                    block.fill_diagonal_(-math.inf)
                _merge_top(values[rows_a], indices[rows_a], block, rows_b.start)
                if symmetric and meta_b is not meta_a:
                    _merge_top(values[rows_b], indices[rows_b], block.T, rows_a.start)
            bar.update()
        bar.close()
        return values, indices

    def soft_density(self, xs=None, *, targets: Tensor | None = None, targets_key: str | None = None) -> Tensor:
        """Soft neighbour counts N_S(x) = sum over the indexed samples x' of k^C(x, x'), without an N x N matrix.

        Two passes over the shards (paper section 4.2): A = sum of the normalised stored Jacobians,
        then N_S(x) = Tr(Q(x) A^T).

        Args:
            xs: None for the indexed samples themselves (the count includes the self term 1), or
                `(Q, ...)` query data counted against the index.

        Returns:
            `(N,)` or `(Q,)`; equal to `netsim.soft_density` for an exact index.
        """
        on_zero = self.manifest["settings"]["on_zero"]
        total = None
        for meta, rep in self._shards():
            normalised = ENGINE.transform(rep, soft_normaliser(ENGINE, rep, None, on_zero, meta["start"]))
            total = ENGINE.add_sums(total, ENGINE.summed(normalised))
        chunks = ((m["start"], r) for m, r in self._shards()) if xs is None else \
            self._query_reps(xs, targets, targets_key)
        counts = []
        for offset, rep in chunks:
            normalised = ENGINE.transform(rep, soft_normaliser(ENGINE, rep, None, on_zero, offset))
            counts.append(ENGINE.dot_with_sums(normalised, total).diagonal(dim1=-2, dim2=-1).sum(-1))
        return torch.cat(counts)

    def explain(self, i: int, j: int, *, kind: str = "correlation") -> OrderedDict[str, float]:
        """Why indexed samples i and j are similar: the kernel split over the modules owning parameters.

        The parts add up to the pair's kernel (as `netsim.similarity_by_module`, whose module
        docstring gives the split of each kind), computed from the stored representation.

        Returns:
            `{module name: contribution}` in the model's module order.
        """
        check_choice("kind", kind, KINDS)
        rep = self._rows([i, j])
        layout = layerwise_layout(rep)
        Qi = self._prepared([(i, ENGINE.map(rep, lambda t: t[:1]))], kind, "rows")
        Qj = self._prepared([(j, ENGINE.map(rep, lambda t: t[1:2]))], kind, "columns")
        parts_i, parts_j = ({m: [Q[e] for e in entries] for m, entries in layout.items()} for Q in (Qi, Qj))
        return OrderedDict((name, float(ENGINE.gram(parts_i[name], parts_j[name], True)[0, 0])) for name in layout)

    def _indexed_data(self, data, targets: Tensor | None, targets_key: str | None, targets_name: str):
        """`data` as a source, refused unless it may be the data the index was built from (its length)."""
        source = as_source(data, targets, targets_key=targets_key, name="data", targets_name=targets_name,
                           device=model_device(self.model))
        if source.length is not None and source.length != len(self):
            raise ValueError(f"data holds {source.length} samples, the index {len(self)}: pass the data the index "
                             "was built from")
        return source

    def _exact_kc(self, xs, ys=None, memory_budget: int | None = None) -> Tensor:
        """Exact k^C from the model (`netsim.similarity` with the index's settings): the reference of
        `calibrate` and `refine`."""
        from .kernel import similarity

        return similarity(self.model, xs, ys, output_fn=self.output_fn, method=self.manifest["engine"],
                          params=self.params, chunk_size=self.chunk_size,
                          on_zero=self.manifest["settings"]["on_zero"], memory_budget=memory_budget)

    def calibrate(self, data, n_pairs: int = 2000, *, targets: Tensor | None = None,
                  targets_key: str | None = None, seed: int = 0) -> dict:
        """Measures the error of the index's k^C against exact kernels, and records it in the manifest.

        Draws a random subset of m indexed samples (seeded; m(m - 1)/2 >= n_pairs), recomputes their
        exact Jacobians from `data` (the data the index was built from, in the same order), and
        compares exact k^C with the index's on every pair of the subset.

        Returns:
            `{"n_pairs", "median_abs_err", "p99_abs_err", "max_abs_err", "mean_err", "seed"}`, and when
            an approximate index is built and current, `calibrate_ann`'s keys (also
            `index.manifest["calibration"]`, saved to disk).
        """
        check_positive_int("n_pairs", n_pairs)
        m = min(len(self), math.ceil((1 + math.sqrt(1 + 8 * n_pairs)) / 2))
        if m < 2:
            raise ValueError("calibrate needs at least two indexed samples")
        source = self._indexed_data(data, targets, targets_key, "targets")
        picked = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:m].sort().values
        exact = self._exact_kc(source.select(picked))
        Q = self._prepared([(0, self._rows(picked.tolist()))], "correlation", "rows")
        stored = self._kernel(Q, Q, "correlation")
        upper = torch.triu_indices(m, m, 1)
        err = (stored - exact)[upper[0], upper[1]].double().cpu()
        report = {"n_pairs": int(err.numel()), "median_abs_err": float(err.abs().median()),
                  "p99_abs_err": float(err.abs().quantile(0.99)), "max_abs_err": float(err.abs().max()),
                  "mean_err": float(err.mean()), "seed": seed}
        try:
            self._ann = ann.opened(self)
        except (FileNotFoundError, ValueError):   # none built, a partial build or a stale one: no recall to measure
            pass
        else:
            report.update(self.calibrate_ann(seed=seed))
        self.manifest["calibration"] = report
        store.write_json(self.path / store.MANIFEST, self.manifest)
        return report


def default_nprobe(nlist: int) -> int:
    """Lists an approximate query scans by default: 1/32 of them, at least 8 (or all, if fewer)."""
    return min(nlist, max(8, math.ceil(nlist / 32)))


def _check_worker(num_shards, shard_id, process_group) -> bool:
    """Whether this build is one worker's slice (`num_shards`, `shard_id` checked)."""
    if num_shards is None and shard_id is None:
        return False
    check_positive_int("num_shards", num_shards)
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an int in [0, num_shards) = [0, {num_shards}), got {shard_id!r}")
    if process_group is not None:
        raise ValueError("give process_group (torch.distributed) or num_shards and shard_id (independent workers), "
                         "not both")
    return True


def _slice_of(worker: int, workers: int, shards: int) -> range:
    """The shards of worker `worker` of `workers`: the worker-th of `workers` contiguous runs of `shards`."""
    return range(worker * shards // workers, (worker + 1) * shards // workers)


def _check_same_build(root: Path, manifest: dict, num_shards: int | None, length: int | None) -> None:
    """Refuses to join an incomplete index being built otherwise: by another number of workers, by
    workers where this is one build (or the reverse), or over data of another length."""
    workers = manifest.get("num_shards")
    if workers is not None and num_shards is not None and workers != num_shards:
        raise FileExistsError(f"{root} is being built by {workers} workers, not {num_shards}: pass "
                              f"num_shards={workers}")
    if workers is not None and num_shards is None:
        raise FileExistsError(f"{root} is being built by {workers} independent workers (num_shards={workers}): pass "
                              "num_shards and shard_id to write a slice, or call SimilarityIndex.merge once they are "
                              "done")
    if workers is None and num_shards is not None:
        raise FileExistsError(f"{root} is being built as one build (no num_shards): resume it without num_shards "
                              "and shard_id, or use another path")
    if manifest.get("length") is not None and length is not None and manifest["length"] != length:
        raise ValueError(f"{root} is being built over {manifest['length']:,} samples, but this data has {length:,}: "
                         "every build of one index passes the same data")


def _missing(root: Path, manifest: dict) -> list[int]:
    """The shards of a worker-built index not written yet (`manifest["length"]` samples in all)."""
    done = {m["index"] for m in store.completed_shards(root)}
    return [s for s in range(math.ceil(manifest["length"] / manifest["settings"]["shard_size"])) if s not in done]


def _finalise(root: Path, manifest: dict, length: int | None) -> dict:
    """The manifest of the completed index (written): every shard present, of the index's settings
    stamp, covering the `length` samples (None: as far as the shards go) contiguously.

    Raises:
        ValueError: missing shards (by worker slice when workers wrote them), or a shard stamped
            with other settings.
    """
    metas = store.completed_shards(root)
    stamp = store.settings_stamp(manifest)
    workers, size = manifest.get("num_shards"), manifest["settings"]["shard_size"]

    def where(s: int) -> str:
        samples = f"samples {s * size}-{min(length or math.inf, (s + 1) * size) - 1}"
        if not workers:
            return samples
        count = math.ceil(length / size)
        worker = next(w for w in range(workers) if s in _slice_of(w, workers, count))
        return f"{samples}, the slice of worker {worker} (shard_id={worker}) of {workers}"

    for meta in metas:   # shards written before stamps existed carry none
        if meta.get("stamp") not in (None, stamp):
            raise ValueError(f"shard {meta['index']} ({where(meta['index'])}) under {root} was written with other "
                             "settings than the index (another model, output function, parameters or sketch): delete "
                             f"{store.shard_name(meta['index'])} and build that slice again with the index's settings")
    if length is not None and (missing := _missing(root, dict(manifest, length=length))):
        shown = "; ".join(f"shard {s} ({where(s)})" for s in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"the index under {root} misses {len(missing)} shard(s): {shown}. Run (or resume) "
                         "SimilarityIndex.build for those slices")
    stops = [m["stop"] for m in metas]
    if not metas or [m["start"] for m in metas] != [0, *stops[:-1]] or stops[-1] != (length or stops[-1]):
        raise RuntimeError(f"the shards under {root} do not cover the data contiguously: "
                           f"{[(m['start'], m['stop']) for m in metas]}")
    manifest = dict(manifest, shards=metas, count=stops[-1], complete=True)
    store.write_json(root / store.MANIFEST, manifest)
    return manifest


def _values_per_sample(rep: Rep) -> int:
    """Values stored per sample by a representation."""
    return sum(f.grads[0].numel() if isinstance(f, DenseFactors) else
               (f.x.shape[1] if f.weight else 0) + f.delta[0].numel() for f in rep)


def _merge_top(values: Tensor, indices: Tensor, block: Tensor, offset: int) -> None:
    """Merges a `(b, c)` block whose columns are samples `offset..` into the running top-k
    `(b, k)` (in place): the block's own top-k first, so only 2k candidates per row are merged."""
    k = values.shape[1]
    top = block.topk(min(k, block.shape[1]), dim=1)
    cand_values = torch.cat([values, top.values], 1)
    cand_indices = torch.cat([indices, top.indices + offset], 1)
    best = cand_values.topk(k, dim=1)
    values.copy_(best.values)
    indices.copy_(cand_indices.gather(1, best.indices))
