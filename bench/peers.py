"""Peer libraries timed by the benchmark (optional: `pip install -e '.[bench]' -c scripts/constraints.txt`).

Nothing here imports a peer at module level: `bench/run.py` imports this module without the
extra and lists the peers as "not installed" (`installed`, `status`).

Methods (`PEERS`), each given the benchmark's model, inputs and `output_fn` as they are:

- "backpack": BackPACK `extend(model)` + `backpack(BatchGrad())`, one backward of the summed
  output per batch and output row (a fresh forward per output row: BackPACK frees what it
  stored after one backward) -> `p.grad_batch` -> G `(N, d, p)`.
- "opacus": Opacus `GradSampleModule(model, loss_reduction="sum")` (model in train mode:
  Opacus records activations only in training mode; the models it accepts have no dropout
  or BatchNorm, so train and eval agree: it refuses BatchNorm), same loop -> `p.grad_sample`
  -> G.
- "nngeometry": nngeometry `Jacobian(model, loader, function)` (a `PFMapDense`, `(d, N, p)`)
  -> G.
- "nngeometry_gram": nngeometry `GramMatrix(model, loader, function)` (an `FMatDense`,
  `(d, N, d, N)`): the N x N kernel without G, normalised to k^C.
- "captum": Captum `TracInCP` with one checkpoint, the model's final weights (learning rate
  1), train set = test set = the N samples, the "loss" the model's output row a (test) and
  b (train): influence[i, j] = g_a(x_i) . g_b(x_j) = K(x_i, x_j)_ab, one `influence` call per
  pair a <= b (d(d+1)/2 calls). k^C from K, normalised by its diagonal (the self-influence
  scores). Captum's batched "sample-wise trick" (`sample_wise_grads_per_batch=True`) handles
  Linear and Conv2d layers only: it silently leaves other layers' parameters out (PReLU of
  the MNIST CNN: k^C off by ~5e-4), so models with other parameterised layers use Captum's
  per-example path (a per-sample `autograd.grad` loop).

The G peers then run the same dense steps as the baselines (`models.dense_normalise`,
`dense_soft`, `dense_sim`). All process `PEER_BATCH` samples per batch.

A model whose forward modifies a module output in place (the registration network's
ReLU(inplace=True)) breaks PyTorch's full backward hooks, which BackPACK and Opacus rely on
("Output 0 of BackwardHookFunction is a view and is being modified inplace"). `prepare`
tries the model as given on 2 samples; on that error it runs the peer on a copy with
`inplace=False` (same function) and reports the variant and the original error.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import models as M
from netsim import without_inplace

#: Samples per batch for every peer (the epoch's batch size).
PEER_BATCH = 128
INSTALL_HINT = "pip install -e '.[bench]' -c scripts/constraints.txt"


@dataclass(frozen=True)
class Peer:
    module: str        # import name
    dist: str          # PyPI distribution (pinned in pyproject.toml's `bench` extra)
    kind: str          # "grads": builds G (N, d, p); "gram": builds K (N, N, d, d)
    label: str         # table label


PEERS: dict[str, Peer] = {
    "backpack": Peer("backpack", "backpack-for-pytorch", "grads", "BackPACK BatchGrad"),
    "opacus": Peer("opacus", "opacus", "grads", "Opacus GradSampleModule"),
    "nngeometry": Peer("nngeometry", "nngeometry", "grads", "nngeometry Jacobian"),
    "nngeometry_gram": Peer("nngeometry", "nngeometry", "gram", "nngeometry GramMatrix"),
    "captum": Peer("captum", "captum", "gram", "Captum TracInCP"),
}


class PeerUnsupported(RuntimeError):
    """The peer cannot compute the exact quantity for this model."""


def installed(method: str) -> bool:
    return importlib.util.find_spec(PEERS[method].module) is not None


def status() -> dict[str, str]:
    """{import name: "installed <version>" or "not installed (...)"} without importing torch code."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for peer in PEERS.values():
        if peer.module in out:
            continue
        try:
            v = version(peer.dist)
        except PackageNotFoundError:
            v = None
        out[peer.module] = (f"installed ({peer.dist}=={v})" if v and importlib.util.find_spec(peer.module)
                            else f"not installed (PyPI: {peer.dist}; {INSTALL_HINT})")
    return out


# --------------------------------------------------------------------------- helpers

def _param_list(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def _outputs(b: M.Bench, model: nn.Module, x: Tensor, t: Tensor | None) -> Tensor:
    return b.outputs(x, t, model)


def _batches(b: M.Bench):
    for start in range(0, b.n, PEER_BATCH):
        stop = min(b.n, start + PEER_BATCH)
        yield start, stop, b.inputs[start:stop], None if b.targets is None else b.targets[start:stop]


def _targets_or_zeros(b: M.Bench) -> Tensor:
    return b.targets if b.targets is not None else torch.zeros(b.n)


# --------------------------------------------------------------------------- BackPACK / Opacus

def _hooked_grads(b: M.Bench, model: nn.Module, names: nn.Module, params, attr: str, context, what: str) -> Tensor:
    """G from a hook-based per-sample-gradient library: per batch and output row, a forward and
    a backward of the summed output row (inside `context()`); reads `p.<attr>`."""
    p_total = sum(p.numel() for _, p in params)
    G = torch.empty(b.n, b.d, p_total)
    for start, stop, x, t in _batches(b):
        for a in range(b.d):
            for _, p in params:
                p.grad = None
                setattr(p, attr, None)
            out = _outputs(b, model, x, t)
            with context():
                out[:, a].sum().backward()
            missing = [k for k, p in params if getattr(p, attr, None) is None]
            if missing:
                kinds = sorted({type(names.get_submodule(k.rpartition(".")[0])).__name__ for k in missing})
                raise PeerUnsupported(f"{what} gives no per-sample gradient for {', '.join(kinds)} "
                                      f"({len(missing)} parameter tensors)")
            torch.cat([getattr(p, attr).reshape(stop - start, -1) for _, p in params], 1, out=G[start:stop, a])
    for _, p in params:
        p.grad = None
        setattr(p, attr, None)
    return G


def _backpack(model: nn.Module) -> Callable[[M.Bench], Tensor]:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad
    model = extend(copy.deepcopy(model))
    params = _param_list(model)
    return lambda b: _hooked_grads(b, model, model, params, "grad_batch", lambda: backpack(BatchGrad()),
                                   "BackPACK BatchGrad")


def _opacus(model: nn.Module) -> Callable[[M.Bench], Tensor]:
    from contextlib import nullcontext

    from opacus import GradSampleModule
    gsm = GradSampleModule(copy.deepcopy(model).train(), loss_reduction="sum")
    params = [(k.removeprefix("_module."), p) for k, p in _param_list(gsm)]
    return lambda b: _hooked_grads(b, gsm, gsm._module, params, "grad_sample", nullcontext,
                                   "Opacus GradSampleModule")


# --------------------------------------------------------------------------- nngeometry

def _nngeometry_function(b: M.Bench, model: nn.Module):
    def function(x, t):
        return _outputs(b, model, x, None if b.targets is None else t)
    return function


def _nngeometry_loader(b: M.Bench):
    from torch.utils.data import DataLoader, TensorDataset
    return DataLoader(TensorDataset(b.inputs, _targets_or_zeros(b)), batch_size=PEER_BATCH)


def _nngeometry_check(model: nn.Module) -> None:
    from nngeometry.layercollection import LayerCollection
    try:
        LayerCollection.from_model(model)
    except Exception as err:  # noqa: BLE001  nngeometry raises a bare Exception
        raise PeerUnsupported(f"nngeometry: {err}") from None


def _nngeometry(model: nn.Module) -> Callable[[M.Bench], Tensor]:
    from nngeometry import Jacobian
    _nngeometry_check(model)

    def run(b):
        J = Jacobian(model, _nngeometry_loader(b), function=_nngeometry_function(b, model)).to_torch()
        return J.permute(1, 0, 2)  # (d, N, p) -> (N, d, p), a view: the dense steps take any strides
    return run


def _nngeometry_gram(model: nn.Module) -> Callable[[M.Bench], Tensor]:
    from nngeometry import GramMatrix
    _nngeometry_check(model)

    def run(b):
        K = GramMatrix(model, _nngeometry_loader(b), function=_nngeometry_function(b, model)).data
        return K.permute(1, 3, 0, 2)  # (d, N, d, N) -> (N, N, d, d)
    return run


# --------------------------------------------------------------------------- Captum

class _OutputRow(nn.Module):
    """Captum "loss": output row `a` of the bench's reduced output, summed over the batch
    (reduction "sum", for the sample-wise trick) or per example (reduction "none")."""

    def __init__(self, b: M.Bench, a: int, reduction: str):
        super().__init__()
        self.output_fn, self.with_targets, self.a, self.reduction = b.output_fn, b.targets is not None, a, reduction

    def forward(self, out: Tensor, t: Tensor) -> Tensor:
        if self.output_fn is not None:
            out = self.output_fn(out, t) if self.with_targets else self.output_fn(out)
        v = out.reshape(out.shape[0], -1)[:, self.a]
        return v.sum() if self.reduction == "sum" else v


def captum_mode(model: nn.Module) -> str:
    """"sample-wise trick" when every parameterised module is Linear / Conv2d, else "per-example"."""
    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return "sample-wise trick" if all(type(m) in (nn.Linear, nn.Conv2d) for m in owners) else "per-example"


def _captum(model: nn.Module) -> Callable[[M.Bench], Tensor]:
    from captum.influence import TracInCP
    from torch.utils.data import DataLoader, TensorDataset
    model = copy.deepcopy(model)
    trick = captum_mode(model) == "sample-wise trick"
    reduction = "sum" if trick else "none"

    def run(b):
        dataset = TensorDataset(b.inputs, _targets_or_zeros(b))
        K = torch.empty(b.n, b.n, b.d, b.d)
        for a in range(b.d):
            for c in range(a, b.d):
                tracin = TracInCP(model, dataset, ["final weights"], checkpoints_load_func=lambda m, path: 1.0,
                                  loss_fn=_OutputRow(b, c, reduction), test_loss_fn=_OutputRow(b, a, reduction),
                                  batch_size=PEER_BATCH, sample_wise_grads_per_batch=trick)
                scores = tracin.influence(DataLoader(dataset, batch_size=PEER_BATCH))  # [test i, train j]
                K[:, :, a, c] = scores
                if c != a:
                    K[:, :, c, a] = scores.T
        return K
    return run


_FACTORIES = {"backpack": _backpack, "opacus": _opacus, "nngeometry": _nngeometry,
              "nngeometry_gram": _nngeometry_gram, "captum": _captum}


# --------------------------------------------------------------------------- entry points

@dataclass
class Prepared:
    """A peer ready to run on a bench (or a subset of it)."""

    method: str
    run: Callable[[M.Bench], Tensor]   # G (N, d, p) or K (N, N, d, d)
    variant: str | None = None         # e.g. "copy with ReLU(inplace=False)"
    as_given_error: str | None = None  # why the model as given failed
    mode: str | None = None            # Captum: which gradient path

    @property
    def kind(self) -> str:
        return PEERS[self.method].kind


def _is_inplace_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "inplace" in str(err).replace("in-place", "inplace")


def prepare(method: str, b: M.Bench) -> Prepared:
    """Sets the peer up for `b.model` and tries it on 2 samples.

    Raises:
        PeerUnsupported: the peer cannot handle the model: its result is incomplete, or it
            fails on the 2 samples (any error but the in-place one handled here).
    """
    import warnings
    factory = _FACTORIES[method]
    mode = captum_mode(b.model) if method == "captum" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK / Captum warn about inputs not requiring grad
        try:
            run = factory(b.model)
            run(b.subset(min(2, b.n)))
            return Prepared(method, run, mode=mode)
        except PeerUnsupported:
            raise
        except Exception as err:  # noqa: BLE001
            if not _is_inplace_error(err):
                raise _unsupported(method, err) from err
            first = _first_line(err)
        run = factory(without_inplace(b.model))
        run(b.subset(min(2, b.n)))
        return Prepared(method, run, variant="copy with ReLU(inplace=False)", as_given_error=first, mode=mode)


def _first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of the error's message; of the first one where the error holds a list of
    errors (Opacus's validation raises one per offending module)."""
    many = err.args[0] if err.args and isinstance(err.args[0], list) and err.args[0] else [err]
    first = (str(many[0]).strip().splitlines() or [""])[0][:limit]
    return first + (f" (and {len(many) - 1} more)" if len(many) > 1 else "")


def _unsupported(method: str, err: BaseException) -> PeerUnsupported:
    """The peer failed on 2 samples of the model as given: it cannot handle the model (e.g.
    Opacus refuses BatchNorm, and its generic per-module fallback replays
    `nn.MultiheadAttention` on one input where it takes query, key and value). The reason keeps
    the peer's own error."""
    return PeerUnsupported(f"{PEERS[method].label} fails on the model: {type(err).__name__}: {_first_line(err)}")


def quiet(fn: Callable):
    """`fn` with the peers' warnings silenced (they would flood the benchmark's output)."""
    import warnings

    def wrapped(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    return wrapped


def gram_passes(method: str, n: int, d: int) -> float:
    """Forward+backward batch passes a gram peer runs for N samples (projections):
    nngeometry's GramMatrix recomputes the inner batches for every outer batch and output row
    (B (B + 1) / 2 d + B for B batches); Captum runs test and train Jacobians once per call."""
    batches = math.ceil(n / PEER_BATCH)
    if method == "nngeometry_gram":
        return batches * (batches + 1) / 2 * d + batches
    return 2.0 * batches * d * (d + 1) / 2
