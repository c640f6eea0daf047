"""Two interchangeable representations of a chunk of per-sample Jacobians.

- `JacobianEngine`: the full `(n, d, p)` Jacobians (`netsim.grads`). Works for any model.
- `LayerwiseEngine`: per-layer factors (`netsim.layerwise`); Linear layers stay factored, so
  memory per sample and the cost of a gram block drop from O(p) to O(sum of layer widths).

The kernels only need a few operations on a representation R of the Jacobians J of n samples,
which both engines implement with identical results (tested against each other):

    self_gram(R)          K(x, x) = J J^T                      (n, d, d)
    transform(R, L)       L J (L mixes output rows)            R'
    gram(Rx, Ry, trace)   J_x J_y^T or its trace               (nx, ny, d, d) / (nx, ny)
    summed(R)             sum over samples of J                S (d rows of p)
    dot_with_sums(R, S)   J(x) S^T                             (n, d, d_S)
    max_abs(R)            an upper bound of each sample's max|J|  (n,)  (for exact rescaling)

`engine_for(model, ..., method="auto")` measures: when the model's structure allows the
layer-wise rules (see `layerwise.factorise`), it times one small chunk (the representation and
its self gram) on each engine and keeps the faster, remembering the choice per model structure
in a small LRU cache (`AUTO_CACHE_SIZE` entries; no model is kept alive); otherwise it uses the
Jacobian engine. Both engines are exact, so the choice changes results only by rounding; pass
`method=` explicitly for bit-for-bit reproducible results across machines. Both engines raise
`NonFiniteError` for a chunk with NaN or infinite gradients, indices counted within `chunks`'
inputs.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from . import layerwise
from .checks import NonFiniteError, check_batch, check_choice, check_model, check_positive_int, check_rtol
from .data import Inputs, as_source, index_inputs, input_rows
from .grads import (
    DEFAULT_CHUNK,
    BatchedJacobian,
    OutputFn,
    VmapFallbackWarning,
    jacobian_chunks,
    num_parameters,
    trainable_parameters,
)
from .memory import check_budget
from .params import ParamSpec

METHODS = ("auto", "layerwise", "jacobian")


class JacobianEngine:
    """Full Jacobians `(n, d, p)`."""

    name = "jacobian"
    tokens = False   # no per-layer factors to keep (see `LayerwiseEngine.tokens`)

    def __init__(self, model: nn.Module, output_fn: OutputFn | None, chunk_size: int | None,
                 params: ParamSpec = None):
        check_positive_int("chunk_size", chunk_size, optional=True)
        self.model, self.output_fn, self.chunk = model, output_fn, chunk_size or DEFAULT_CHUNK
        self.params = params  # the selected parameters (`netsim.params`)
        self._jacobians = None   # built on the first chunk (after the model and data are checked)

    def chunks(self, inputs: Inputs, targets: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
        check_model(self.model)
        if self._jacobians is None:
            self._jacobians = BatchedJacobian(self.model, self.output_fn, trainable_parameters(self.model, self.params))
        yield from jacobian_chunks(as_source(inputs, targets, name="inputs"), self.chunk, self._jacobians)

    def bytes_per_sample(self, d: int, itemsize: int) -> int:
        return d * num_parameters(self.model, self.params) * itemsize

    @staticmethod
    def size(rep: Tensor) -> int:
        return rep.shape[0]

    @staticmethod
    def nbytes(rep: Tensor) -> int:
        return rep.numel() * rep.element_size()

    @staticmethod
    def shape(rep: Tensor) -> tuple[int, int]:
        """(n samples, d outputs)."""
        return rep.shape[0], rep.shape[1]

    @staticmethod
    def cat(reps: list[Tensor]) -> Tensor:
        return reps[0] if len(reps) == 1 else torch.cat(reps)

    @staticmethod
    def map(rep: Tensor, fn) -> Tensor:
        """`fn` applied to each per-sample tensor of the representation (see `LayerwiseEngine.map`)."""
        return fn(rep)

    @staticmethod
    def tensors(rep: Tensor) -> list[Tensor]:
        return [rep]

    @staticmethod
    def self_gram(rep: Tensor) -> Tensor:
        return rep @ rep.transpose(1, 2)

    @staticmethod
    def transform(rep: Tensor, left: Tensor) -> Tensor:
        return left @ rep

    @staticmethod
    def gram(rx: Tensor, ry: Tensor, trace: bool) -> Tensor:
        nx, d, p = rx.shape
        ny = ry.shape[0]
        if trace:  # Tr(A B^T) is one flattened dot: a single (nx, d p) x (d p, ny) GEMM
            if rx is not ry:
                return rx.reshape(nx, d * p) @ ry.reshape(ny, d * p).T
            flat = rx.reshape(nx, d * p)   # a block with itself: the upper tiles, mirrored
            return layerwise.mirror_upper_(layerwise.add_gram_(flat.new_zeros(nx, nx), flat, flat, True))
        return (rx.reshape(nx * d, p) @ ry.reshape(ny * d, p).T).reshape(nx, d, ny, d).permute(0, 2, 1, 3)

    @staticmethod
    def max_abs(rep: Tensor) -> Tensor:
        return rep.abs().amax((1, 2))

    @staticmethod
    def summed(rep: Tensor) -> list[Tensor]:
        return [rep.sum(0)]

    @staticmethod
    def add_sums(s1: list | None, s2: list) -> list:
        return s2 if s1 is None else [s1[0] + s2[0]]

    @staticmethod
    def dot_with_sums(rep: Tensor, sums: list[Tensor]) -> Tensor:
        return rep @ sums[0].T

    @staticmethod
    def sum_tensors(sums: list) -> list[Tensor]:
        return list(sums)

    def tangent(self, sums: list, row: int) -> dict[str, Tensor]:
        """Row `row` of the sums as a parameter-shaped direction {name: tensor}."""
        out, offset = {}, 0
        for name, p in trainable_parameters(self.model, self.params).items():
            out[name] = sums[0][row, offset:offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return out


class LayerwiseEngine:
    """Per-layer factors (`netsim.layerwise`)."""

    name = "layerwise"
    #: Default chunk: about this many bytes of factors per chunk, between 16 and 256 samples.
    #: Large chunks amortise Python overhead (MLPs); conv layers' unfolded inputs and per-sample
    #: gradients make large chunks fall out of cache (1M-parameter CNN, 1 thread: 2.4x an
    #: epoch for the soft density at 32-64 samples per chunk, 3.3x at 256).
    chunk_bytes = 16 * 2**20
    #: ... and this many with token maps kept as per-token factors, whose sums and dot products are
    #: GEMMs over the chunk's tokens (soft density of BERT, N = 4096: 2.6x an epoch at 128 samples
    #: per chunk, 3.6x at the 29 of 16 MiB).
    token_chunk_bytes = 32 * 2**20

    def __init__(self, model: nn.Module, output_fn: OutputFn | None, chunk_size: int | None,
                 probe: list | None = None, copy_records: bool | None = None, params: ParamSpec = None,
                 probe_inputs: tuple | None = None):
        check_positive_int("chunk_size", chunk_size, optional=True)
        self.model, self.output_fn, self.params = model, output_fn, params
        # The one-sample probe that selected this engine: its size per sample, and its layout
        # (layer kinds, parameter names), which `tangent` maps sums back to parameters with; its
        # (inputs, targets), to size the chunks of token mode.
        self._template, self._probe_inputs = probe, probe_inputs
        # Whether the forward modifies recorded tensors in place (found by the probe): this
        # engine's chunks then record copies from the start, without a second forward.
        self.copy_records = copy_records
        self.sample_bytes = self.nbytes(probe) if probe else 0
        self._chunk_size = chunk_size
        self.chunk = chunk_size or self._chunk_for(self.sample_bytes, self.chunk_bytes)
        self._tokens = self.has_tokens = False   # has_tokens: token mode found token maps in the probe

    @staticmethod
    def _chunk_for(sample_bytes: int, target: int) -> int:
        return int(min(256, max(16, target // max(sample_bytes, 1))))

    @property
    def tokens(self) -> bool:
        """Whether chunks keep token maps as per-token factors (`layerwise.factorise_layout(tokens=)`):
        set by the consumers that sum or sketch them (`soft_density`, `SimilarityIndex`), never by
        the kernels'. Setting it sizes the chunks (unless given) to `token_chunk_bytes` of factors."""
        return self._tokens

    @tokens.setter
    def tokens(self, value: bool) -> None:
        self._tokens, self.has_tokens = bool(value), False
        token_bytes = None
        if self._tokens and self._probe_inputs is not None:
            inputs, targets = self._probe_inputs
            probe, _ = layerwise.factorise_layout(self.model, inputs, self.output_fn, targets, copy=self.copy_records,
                                                  params=self.params, tokens=True)
            self.has_tokens = any(isinstance(f, (layerwise.TokenFactors, layerwise.TokenSum)) for f in probe)
            token_bytes = self.nbytes(probe) if self.has_tokens else None
        if self._chunk_size is None:
            self.chunk = (self._chunk_for(self.sample_bytes, self.chunk_bytes) if token_bytes is None else
                          self._chunk_for(token_bytes, self.token_chunk_bytes))

    def chunks(self, inputs: Inputs, targets: Tensor | None = None) -> Iterator[tuple[int, list]]:
        for start in range(0, input_rows(inputs), self.chunk):
            sub = None if targets is None else targets[start:start + self.chunk]
            try:  # once copies were needed they are made from the start; until then, checked per chunk
                factors, self.copy_records = layerwise.factorise_layout(
                    self.model, index_inputs(inputs, slice(start, start + self.chunk)), self.output_fn, sub,
                    copy=True if self.copy_records else None, params=self.params, tokens=self.tokens)
            except NonFiniteError as error:
                raise error.shifted(start) from None
            yield start, factors

    def tangent(self, sums: list, row: int) -> dict[str, Tensor]:
        """Row `row` of the sums as a parameter-shaped direction {name: tensor}."""
        if self._template is None:
            raise ValueError("tangent needs the layer layout: build the engine with engine_for (or a probe)")
        return layerwise.sums_as_parameters(self._template, sums, row, self.model)

    def bytes_per_sample(self, d: int, itemsize: int) -> int:
        return self.sample_bytes

    @staticmethod
    def size(rep: list) -> int:
        return LayerwiseEngine.shape(rep)[0]

    @staticmethod
    def nbytes(rep: list) -> int:
        # a tensor held by several entries counts once (the input shared by attention's q, k and v maps)
        unique = {(t.data_ptr(), t.shape, t.stride()): t for t in layerwise.entry_tensors(rep)}
        return sum(t.numel() * t.element_size() for t in unique.values())

    @staticmethod
    def shape(rep: list) -> tuple[int, int]:
        """(n samples, d outputs)."""
        return layerwise.entry_shape(rep[0])

    @staticmethod
    def cat(reps: list[list]) -> list:
        if len(reps) == 1:
            return reps[0]
        out = []
        for layer in zip(*reps):
            f0 = layer[0]
            if isinstance(f0, layerwise.DenseFactors):
                out.append(layerwise.DenseFactors(torch.cat([f.grads for f in layer]), f0.names))
            else:
                out.append(layerwise.LinearFactors(torch.cat([f.x for f in layer]), torch.cat([f.delta for f in layer]),
                                                   f0.bias, f0.weight, f0.names))
        return out

    map = staticmethod(layerwise.map_entries)
    tensors = staticmethod(layerwise.entry_tensors)
    self_gram = staticmethod(layerwise.self_gram)
    transform = staticmethod(layerwise.transform)
    summed = staticmethod(layerwise.summed)
    add_sums = staticmethod(layerwise.add_sums)
    sum_tensors = staticmethod(layerwise.sums_as_tensors)
    dot_with_sums = staticmethod(layerwise.dot_with_sums)

    @staticmethod
    def gram(rx: list, ry: list, trace: bool) -> Tensor:
        return layerwise.gram(rx, ry, trace=trace)  # the engine interface takes trace positionally

    @staticmethod
    def max_abs(rep: list) -> Tensor:
        """Per sample, the largest |entry| of the dense blocks and max|Delta| max(max|X|, 1) of the
        factored layers: within a factor of (input width) of the Jacobian's largest entry."""
        out = None
        for f in rep:
            if isinstance(f, layerwise.DenseFactors):
                m = f.grads.abs().amax((1, 2))
            elif isinstance(f, layerwise.TokenFactors):   # a sum over T tokens of |Delta| |x| at most
                inputs = 1.0 if f.kind == "embedding" else f.x.abs().amax((1, 2)).clamp_min(1.0)
                m = f.delta.abs().amax((1, 2, 3)) * inputs * f.delta.shape[2]
            else:
                m = f.delta.abs().amax((1, 2)) * f.x.abs().amax(1).clamp_min(1.0)
            out = m if out is None else torch.maximum(out, m)
        return out


#: How many model structures `method="auto"` remembers its measured choice for.
AUTO_CACHE_SIZE = 64
#: Samples in the chunk `method="auto"` times on each engine, and the most bytes of
#: representation that chunk may take (fewer samples for models with large Jacobians).
AUTO_PROBE_SAMPLES = 16
AUTO_PROBE_BYTES = 256 * 2**20
_AUTO_CHOICES: OrderedDict[tuple, str] = OrderedDict()
_AUTO_LOCK = threading.Lock()


def check_engine_options(model: nn.Module, *, method: str, chunk_size: int | None, params: ParamSpec,
                         rtol: float | None = None, memory_budget: int | None = None) -> None:
    """The option checks every kernel front-end runs before the model does: method, chunk
    size, memory budget, rtol, the model and the `params=` selection."""
    check_choice("method", method, METHODS)
    check_positive_int("chunk_size", chunk_size, optional=True)
    check_budget(memory_budget)
    check_rtol(rtol)
    check_model(model)
    trainable_parameters(model, params)


def engine_for(model: nn.Module, inputs: Inputs, output_fn: OutputFn | None = None,
               targets: Tensor | None = None, chunk_size: int | None = None, method: str = "auto",
               clock: Callable[[], float] = time.perf_counter, params: ParamSpec = None, measure: bool = True):
    """The engine to use for this model: the faster exact one (auto, measured), or as asked.

    A probe factorises the first sample (a forward and d backward passes on it), after the
    model and the batch have been checked. If the layer-wise rules accept the model, `auto`
    then times both engines on the first `AUTO_PROBE_SAMPLES` samples (their representation
    and its self gram, by `clock`, each after an untimed warm-up) and keeps the faster; the
    choice is cached per model structure (module types, parameter names, shapes and
    trainability, d, sample shape, dtype, device and chunk size), so later calls on the same
    kind of model do not measure again. With `measure=False`, `auto` takes the layer-wise engine
    wherever its rules run, for the consumers that gain from its per-layer factors whatever a
    kernel's timing says (sketches, soft density's sums over token maps).

    `auto` survives an engine failing at any point of its probe: an engine that raises (the
    layer-wise rules refusing the model, `UnsupportedModel`, silently; any other error with a
    one-line `EngineFailedWarning` naming it) is left out, and the others are timed. A data
    error (`NonFiniteError`) is the data's, not the engine's: it propagates. When every engine
    fails, the Jacobian engine's error propagates.

    Raises:
        ValueError: unknown method; `method="layerwise"` on a model the rules cannot handle
            (`layerwise.UnsupportedModel`, naming the module, e.g. an LSTM).
    """
    check_choice("method", method, METHODS)
    check_model(model)
    check_batch(model, inputs, targets)
    check_positive_int("chunk_size", chunk_size, optional=True)
    jacobian = JacobianEngine(model, output_fn, chunk_size, params)
    if method == "jacobian":
        return jacobian
    first = None if targets is None else targets[:1]
    sample = (index_inputs(inputs, slice(0, 1)), first)
    if method == "layerwise":
        probe, copy = layerwise.factorise_layout(model, sample[0], output_fn, first, params=params, verify=True)
        return LayerwiseEngine(model, output_fn, chunk_size, probe, copy, params, sample)
    try:
        probe, copy = layerwise.factorise_layout(model, sample[0], output_fn, first, params=params, verify=True)
    except Exception as error:  # noqa: BLE001 -- any engine failure: auto goes on without it
        if not isinstance(error, (layerwise.UnsupportedModel, NonFiniteError)):
            # the same sample on the Jacobian engine: an error of the user's (an output_fn returning
            # the wrong shape) is raised from there, without a warning blaming the engine
            for _ in jacobian.chunks(index_inputs(inputs, slice(0, 1)), first):
                pass
        left_out("layerwise", error)
        return jacobian
    engine = LayerwiseEngine(model, output_fn, chunk_size, probe, copy, params, sample)
    if not measure:
        return engine
    d, itemsize = LayerwiseEngine.shape(probe)[1], layerwise.entry_tensors(probe)[0].element_size()
    key = (_structure_key(model, inputs, targets, chunk_size, d), tuple(trainable_parameters(model, params)))
    with _AUTO_LOCK:
        choice = _AUTO_CHOICES.get(key)
    if choice is None:   # measured outside the lock: threads timing other models are not held up
        choice = _faster([engine, jacobian], inputs, targets, d, itemsize, clock)
    with _AUTO_LOCK:
        choice = _AUTO_CHOICES.setdefault(key, choice)   # a thread that measured first keeps its choice
        _AUTO_CHOICES.move_to_end(key)
        if len(_AUTO_CHOICES) > AUTO_CACHE_SIZE:
            _AUTO_CHOICES.popitem(last=False)
    return engine if choice == engine.name else jacobian


class EngineFailedWarning(UserWarning):
    """`method="auto"` left out an engine that raised on this model."""


def left_out(name: str, error: Exception) -> None:
    """Lets `auto` go on without the engine `name` that raised `error` (a data error propagates)."""
    if isinstance(error, NonFiniteError):
        raise error
    if not isinstance(error, layerwise.UnsupportedModel):  # a refusal is expected; anything else is news
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        warnings.warn(f"netsim: the {name} engine failed on this model ({type(error).__name__}: {first_line}); "
                      "method='auto' goes on without it", EngineFailedWarning, stacklevel=4)


def _faster(engines: list, inputs: Inputs, targets: Tensor | None, d: int, itemsize: int,
            clock: Callable[[], float]) -> str:
    """The name of the engine that builds and self-grams a chunk of `inputs` in the least `clock`
    time per sample (the first of equals), among those that run. Each times up to
    `AUTO_PROBE_SAMPLES` samples, fewer where their representation would exceed
    `AUTO_PROBE_BYTES`, after an untimed run on one sample: first-call costs (vmap's tracing,
    the first allocations) are not the engine's speed. An engine that raises is left out
    (`left_out`); if all do, the last one's error propagates."""
    per_sample = {}
    for k, engine in enumerate(engines):
        n = AUTO_PROBE_BYTES // max(engine.bytes_per_sample(d, itemsize), 1)
        n = max(1, min(AUTO_PROBE_SAMPLES, n, input_rows(inputs)))
        try:
            with warnings.catch_warnings():   # the notes of an engine being timed are not the user's concern
                warnings.simplefilter("ignore", VmapFallbackWarning)
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                for timed, m in ((False, 1), (True, n)):
                    start = clock() if timed else None
                    for _, rep in engine.chunks(index_inputs(inputs, slice(0, m)),
                                                None if targets is None else targets[:m]):
                        engine.gram(rep, rep, True)
                per_sample[k] = (clock() - start) / n
        except Exception as error:  # noqa: BLE001 -- auto chooses among the engines that work
            if k == len(engines) - 1 and not per_sample:
                raise
            left_out(engine.name, error)
    return engines[min(per_sample, key=per_sample.__getitem__)].name


def _structure_key(model: nn.Module, inputs: Inputs, targets: Tensor | None, chunk_size: int | None,
                   d: int) -> tuple:
    """What the relative speed of the engines depends on, without holding the model."""
    modules = tuple(type(m) for m in model.modules())
    params = tuple((name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters())
    tensors = sorted(inputs.items()) if isinstance(inputs, dict) else [("", inputs)]
    samples = tuple((k, tuple(v.shape[1:]), v.dtype, v.device.type) for k, v in tensors)
    return (modules, params, d, samples, targets is None, chunk_size)
