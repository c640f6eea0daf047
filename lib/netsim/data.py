"""The data forms every public function accepts, streamed chunk by chunk.

Where a function takes `xs` (or `ys`, `reference`, `queries`) it accepts:

- a Tensor `(N, ...)`;
- a `torch.utils.data.Dataset` (map-style: read in slices of the chunk size, items collated
  with `default_collate`; an `IterableDataset` yields single samples);
- a `DataLoader`, or any iterable of batches (a list, a generator).

A batch (or a Dataset item) is a tensor; a tuple or list `(x, y, ...)` whose x is the input and
y the targets handed to `output_fn(out, targets)` (further entries are ignored); or a dict of
tensors passed to the model as keyword arguments, its targets taken from the key named by
`targets_key` (that key is not passed to the model). Inputs may thus be a tensor or a dict of
tensors ("keyword inputs"), every tensor batched along dim 0.

`as_source` wraps any of these in a `Source`, whose `chunks(size)` yields `(offset, inputs,
targets)` in the data's order with `size` samples per chunk (the last may be shorter):
a loader's batches are cut and joined to the engines' chunk size, so the results equal those of
one tensor and memory stays bounded by the chunk size (data is never concatenated beyond one
chunk). Batches of different sample shapes (dynamic padding: each batch of token ids padded to
its own length, as `transformers`' `DataCollatorWithPadding` does) are never joined: a chunk
also ends where the shape changes, and may then hold fewer than `size` samples. Data that is
not a tensor is moved to the model's device chunk by chunk; a tensor must already be there.
Each `chunks` call is one pass over the data: a one-shot iterator (a generator) supports one
pass, and a function that needs more says so before the model runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, Subset, default_collate

Inputs = Tensor | dict[str, Tensor]


def input_rows(inputs: Inputs) -> int:
    """N, the batch size of a tensor or of a dict of tensors."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


def index_inputs(inputs: Inputs, index) -> Inputs:
    """`inputs[index]` (a slice or an index tensor) for a tensor or each tensor of a dict."""
    if isinstance(inputs, Tensor):
        return inputs[index]
    return {k: v[index] for k, v in inputs.items()}


def _cat(parts: list):
    if parts[0] is None:
        return None
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _to(inputs, device):
    if inputs is None or device is None:
        return inputs
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    return {k: v.to(device) for k, v in inputs.items()}


def split_batch(batch, targets_key: str | None = None, name: str = "xs") -> tuple[Inputs, Tensor | None]:
    """`(inputs, targets)` of one batch (see the module for the forms); targets may be None.

    Raises:
        TypeError: a batch of another type, or a dict with a non-tensor value.
        ValueError: an empty tuple, a missing `targets_key`, tensors with different numbers of rows.
    """
    if isinstance(batch, Tensor):
        inputs, targets = batch, None
    elif isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("an empty tuple is not a batch: expected (x, y, ...)")
        inputs, targets = batch[0], (batch[1] if len(batch) > 1 else None)
        if isinstance(inputs, Mapping):
            inputs = dict(inputs)
    elif isinstance(batch, Mapping):
        inputs = dict(batch)
        targets = None
        if targets_key is not None:
            if targets_key not in inputs:
                raise ValueError(f"targets_key {targets_key!r} is not a key of the batch (keys: {sorted(inputs)})")
            targets = inputs.pop(targets_key)
        if not inputs:
            raise ValueError("the dict batch has no input left once the targets are taken out")
    else:
        raise TypeError(f"each batch of {name} must be a tensor, a tuple (x, y, ...) or a dict of tensors, got "
                        f"{type(batch).__name__}")
    if isinstance(inputs, dict):
        for k, v in inputs.items():
            if not isinstance(v, Tensor):
                raise TypeError(f"every value of a dict batch must be a tensor (the model's keyword arguments); "
                                f"{k!r} is a {type(v).__name__}")
        if len({v.shape[0] if v.ndim else -1 for v in inputs.values()}) != 1 or \
                next(iter(inputs.values())).ndim == 0:
            raise ValueError("the tensors of a dict batch must share their first dimension (the samples): got "
                             + ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items()))
    elif not isinstance(inputs, Tensor):
        raise TypeError(f"the input of each batch of {name} must be a tensor or a dict of tensors, got "
                        f"{type(inputs).__name__}")
    if targets is not None and not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    return inputs, targets


class Source:
    """Samples to stream. Build with `as_source`.

    Attributes:
        name: the argument's name, for error messages.
        length: the number of samples when known without running the model, else None.
        reiterable: whether more than one pass is possible.
    """

    def __init__(self, name: str, targets: Tensor | None, targets_key: str | None, device):
        self.name, self.targets, self.targets_key, self.device = name, targets, targets_key, device
        self.targets_name = "targets"
        self.length: int | None = None
        self.reiterable = True
        self._passes = 0

    def require_passes(self, passes: int, what: str) -> None:
        """Raise before any pass if the source cannot be read `passes` times."""
        if passes > 1 and not self.reiterable:
            raise ValueError(f"{what} reads {self.name} {passes} times, but it is a one-shot iterator (e.g. a "
                             "generator): pass a re-iterable instead (a list of batches, a Dataset or a DataLoader)")

    def _batches(self, start: int) -> tuple[int, Iterator[tuple[Inputs, Tensor | None]]]:
        """`(position of the first batch, batches)`; the batches begin at or before `start`."""
        raise NotImplementedError

    def chunks(self, size: int, start: int = 0, stop: int | None = None, *, block: int | None = None
               ) -> Iterator[tuple[int, Inputs, Tensor | None]]:
        """`(offset, inputs, targets)` for samples `[start, stop)` in chunks of `size` (the last may be
        shorter), on the model's device. One pass over the data. With `block`, chunks also end at
        every multiple of `block` after `start` (row blocks made of whole chunks, in one pass).

        Raises:
            ValueError: a second pass over a one-shot iterator; targets given both as `targets=` and in
                the batches, or present in some batches only; a targets tensor whose length differs
                from the data's; no sample at all.
        """
        if self._passes and not self.reiterable:
            raise ValueError(f"{self.name} is a one-shot iterator (e.g. a generator) that was already read: "
                             "pass a re-iterable (a list of batches, a Dataset or a DataLoader)")
        self._passes += 1
        return self._chunks(size, start, stop, block)

    def _chunks(self, size, start, stop, block=None):
        whole, origin = start == 0 and stop is None, start
        position, batches = self._batches(start)
        pending, held, seen_targets = [], 0, None
        for inputs, targets in batches:
            n = input_rows(inputs)
            if self.targets is not None:
                if targets is not None:
                    raise ValueError(f"the batches of {self.name} carry targets and targets were also passed: "
                                     "give them once")
                targets = self.targets[position:position + n]
                if targets.shape[0] != n:
                    raise ValueError(f"the targets passed for {self.name} have {self.targets.shape[0]} rows, fewer "
                                     "than its samples")
            elif seen_targets is None:
                seen_targets = targets is not None
            elif seen_targets != (targets is not None):
                raise ValueError(f"some batches of {self.name} carry targets and others do not")
            lo, hi = max(start - position, 0), n if stop is None else min(n, stop - position)
            position += n
            if lo > 0 or hi < n:
                if hi <= lo:
                    if stop is not None and position >= stop:
                        break
                    continue
                inputs, targets = index_inputs(inputs, slice(lo, hi)), None if targets is None else targets[lo:hi]
            if pending and _sample_shapes(pending[-1][0]) != _sample_shapes(inputs):   # dynamic padding
                yield start, _to(_cat([p[0] for p in pending]), self.device), _to(_cat([p[1] for p in pending]),
                                                                                  self.device)
                start += held
                pending, held = [], 0
            pending.append((inputs, targets))
            held += hi - lo
            while held >= (want := _chunk_length(size, block, start - origin)):  # cut and join to chunks
                joined, joined_targets = _cat([p[0] for p in pending]), _cat([p[1] for p in pending])
                yield (start, _to(index_inputs(joined, slice(0, want)), self.device),
                       None if joined_targets is None else _to(joined_targets[:want], self.device))
                start += want
                held -= want
                pending = [(index_inputs(joined, slice(want, None)),
                            None if joined_targets is None else joined_targets[want:])] if held else []
            if stop is not None and position >= stop:
                break
        if held:
            yield start, _to(_cat([p[0] for p in pending]), self.device), _to(_cat([p[1] for p in pending]),
                                                                              self.device)
        if whole and position == 0:
            raise ValueError(f"{self.name} holds no sample")
        if whole and self.targets is not None and position != self.targets.shape[0]:
            raise ValueError(f"the targets passed for {self.name} have {self.targets.shape[0]} rows for "
                             f"{position} samples: one per sample needed")

    def rows(self, start: int, stop: int) -> Source:
        """The samples `[start, stop)` as a source of their own (offsets counted from `start`)."""
        return _Rows(self, start, stop)

    def select(self, index: Tensor) -> Source:
        """The samples at `index` (`(Q,)` row numbers, any order), as a source of their own: picked
        directly from a tensor or a Dataset; from other data in one pass that holds the Q inputs."""
        wanted: dict[int, list[int]] = {}
        for k, i in enumerate(index.tolist()):
            wanted.setdefault(int(i), []).append(k)
        picked: list = [None] * len(index)
        for offset, inputs, targets in self.chunks(64):
            for r in range(input_rows(inputs)):
                for k in wanted.get(offset + r, ()):
                    picked[k] = (index_inputs(inputs, slice(r, r + 1)), None if targets is None else targets[r:r + 1])
        # One batch per sample: the chunks join them again, except across sample shapes (dynamic padding).
        batches = [p if p[1] is not None else p[0] for p in picked]
        return IterableSource(self.name, batches, None, None, self.device, batched=True)

    def first(self, n: int = 1) -> tuple[Inputs, Tensor | None]:
        """The first `n` samples (fewer if there are not as many), inputs and targets; not counted
        as a pass (a one-shot iterator replays them in its pass)."""
        for _, inputs, targets in self._chunks(n, 0, n):
            return inputs, targets
        raise ValueError(f"{self.name} holds no sample")


class TensorSource(Source):
    def __init__(self, name, data: Tensor, targets, device):
        super().__init__(name, targets, None, None)  # a tensor stays where it is: check_batch names a mismatch
        self.data, self.length = data, data.shape[0]

    def _chunks(self, size, start, stop, block=None):
        stop = self.length if stop is None else min(stop, self.length)
        s = start
        while s < stop:
            e = min(stop, s + _chunk_length(size, block, s - start))
            yield s, self.data[s:e], None if self.targets is None else self.targets[s:e]
            s = e


    def rows(self, start, stop):
        return TensorSource(self.name, self.data[start:stop],
                            None if self.targets is None else self.targets[start:stop], None)

    def select(self, index):
        return TensorSource(self.name, self.data[index.to(self.data.device)],
                            None if self.targets is None else self.targets[index.to(self.targets.device)], None)


class DatasetSource(Source):
    """A map-style Dataset, read in slices of the chunk size from the first sample asked for."""

    def __init__(self, name, data: Dataset, targets, targets_key, device):
        super().__init__(name, targets, targets_key, device)
        self.data, self.length = data, len(data)
        self._size = 1

    def _chunks(self, size, start, stop, block=None):
        self._size = size
        yield from super()._chunks(size, start, stop, block)

    def select(self, index):
        source = DatasetSource(self.name, Subset(self.data, index.tolist()),
                               None if self.targets is None else self.targets[index.to(self.targets.device)],
                               self.targets_key, self.device)
        source.targets_name = self.targets_name
        return source

    def _batches(self, start):
        end = self.length
        return start, (split_batch(default_collate([self.data[i] for i in range(s, min(end, s + self._size))]),
                                   self.targets_key, self.name) for s in range(start, end, self._size))


class IterableSource(Source):
    """Batches (`batched=True`: a DataLoader or any iterable) or single samples (an IterableDataset)."""

    def __init__(self, name, data: Iterable, targets, targets_key, device, batched: bool):
        super().__init__(name, targets, targets_key, device)
        self.data, self.batched = data, batched
        self.reiterable = not isinstance(data, Iterator)   # a generator or iterator is read once
        if isinstance(data, DataLoader):
            self.length = _loader_length(data)
        elif isinstance(data, (list, tuple)) and batched:  # in memory: counting costs nothing
            self.length = sum(input_rows(split_batch(b, targets_key, name)[0]) for b in data)
        self._replay: list = []       # a one-shot iterator's items read by `first`, replayed by the pass
        self._iterator = None if self.reiterable else iter(data)

    def _raw(self) -> Iterator:
        if self.reiterable:
            yield from self.data
            return
        yield from list(self._replay)
        for item in self._iterator:
            if not self._passes:       # read by `first`: keep it for the pass
                self._replay.append(item)
            yield item

    def _batches(self, start):
        if self.batched:
            return 0, (split_batch(batch, self.targets_key, self.name) for batch in self._raw())
        return 0, self._collated()

    def _collated(self):
        samples = []
        for item in self._raw():
            samples.append(item)
            if len(samples) == 64:
                yield split_batch(default_collate(samples), self.targets_key, self.name)
                samples = []
        if samples:
            yield split_batch(default_collate(samples), self.targets_key, self.name)


class _Rows(Source):
    """A contiguous range of another source's samples."""

    def __init__(self, parent: Source, start: int, stop: int):
        super().__init__(parent.name, None, None, parent.device)
        self.parent, self.start, self.stop = parent, start, stop
        self.length, self.reiterable = stop - start, parent.reiterable

    def _chunks(self, size, start, stop, block=None):
        stop = self.length if stop is None else min(stop, self.length)
        for offset, inputs, targets in self.parent.chunks(size, self.start + start, self.start + stop, block=block):
            yield offset - self.start, inputs, targets


def _sample_shapes(inputs: Inputs) -> tuple:
    """The shape of one sample of each input tensor (what batches must share to be joined)."""
    if isinstance(inputs, Tensor):
        return tuple(inputs.shape[1:])
    return tuple((k, tuple(v.shape[1:])) for k, v in inputs.items())


def _chunk_length(size: int, block: int | None, done: int) -> int:
    """Samples in the next chunk: `size`, cut at the next multiple of `block` (`done` read so far)."""
    return size if block is None else min(size, block - done % block)


def _loader_length(loader: DataLoader) -> int | None:
    """Samples a DataLoader yields, when its sampler tells (a map-style dataset, automatic batching)."""
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return None
    try:
        n = len(loader.sampler)
    except TypeError:
        return None
    return n - n % loader.batch_size if loader.drop_last else n


def as_source(data, targets: Tensor | None = None, *, targets_key: str | None = None, name: str = "xs",
              targets_name: str = "targets", device=None) -> Source:
    """Wraps a tensor, Dataset, DataLoader or iterable of batches (see the module) for streaming.

    Args:
        data: the samples.
        targets: optional per-sample targets, one row per sample in the data's order (not allowed
            when the batches carry targets themselves).
        targets_key: the key of the targets in dict batches.
        name, targets_name: the arguments' names, for error messages.
        device: where chunks of non-tensor data are moved (the model's device).

    Raises:
        TypeError: data of another type; targets that are not a tensor.
    """
    if targets is not None and not isinstance(targets, Tensor):
        raise TypeError(f"{targets_name} must be a torch.Tensor with one row per sample, got {type(targets).__name__}")
    if targets_key is not None and not isinstance(targets_key, str):
        raise TypeError(f"targets_key must be a string (a key of the dict batches), got {targets_key!r}")
    if isinstance(data, Source):
        return data
    source = _source(data, targets, targets_key, name, device)
    source.targets_name = targets_name
    return source


def _source(data, targets, targets_key, name, device) -> Source:
    if isinstance(data, Tensor):
        if targets_key is not None:
            raise ValueError(f"targets_key was given but {name} is a tensor, not dict batches")
        return TensorSource(name, data, targets, device)
    if isinstance(data, Mapping):  # one dict batch held in memory (keyword inputs)
        return IterableSource(name, [data], targets, targets_key, device, batched=True)
    if isinstance(data, IterableDataset):
        return IterableSource(name, data, targets, targets_key, device, batched=False)
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        raise ValueError(f"{name} is a DataLoader with shuffle=True: its order changes at every pass, so the "
                         "results could not be matched to the samples (and passes would disagree). Pass a "
                         "DataLoader with shuffle=False")
    if isinstance(data, Dataset):
        if not hasattr(data, "__len__"):
            raise TypeError(f"{name} is a map-style Dataset without __len__: netsim needs to know its size")
        return DatasetSource(name, data, targets, targets_key, device)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        return IterableSource(name, data, targets, targets_key, device, batched=True)
    raise TypeError(f"{name} must be a tensor, a Dataset, a DataLoader or an iterable of batches, got "
                    f"{type(data).__name__}")
