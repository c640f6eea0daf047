"""The benchmark models, their inputs, their training loss, and the baseline methods.

Every benchmark model has d = 1 output after its `output_fn` (the paper's regression output
for the sinusoid MLP, the "right class vs the rest" output for the classifiers), so the
correlation kernel of two samples is the cosine of their parameter gradients.

Models (`MODELS`):

- "mlp": `netsim.data.sinusoid.sinusoid_mlp(seed=0)`, 21,057 parameters, inputs `(N, 2)` from
  `make_sinusoid` (points on the unit circle), epoch loss L1 (the authors' loss).
- "mnist_cnn": `netsim.speedup.mnist_cnn(0)`, 317,069 parameters (PReLU), inputs
  `(N, 1, 28, 28)` standard normal with random integer labels, `output_fn=class_vs_rest`,
  epoch loss cross-entropy.
- "cnn1m": `cnn_1m()` below, 1,295,050 parameters, inputs `(N, 3, 32, 32)`, like mnist_cnn.
- "registration": the registration network does not exist yet; listed as not available.

Inputs are synthetic (seeded): the timings do not depend on the values, only on the shapes
(and, for ReLU networks, hardly on the activation pattern).

Baselines (`naive_grads`, `vmap_grads`, `dense_soft_density`, `dense_similarity`):

- naive: the authors' method, one autograd backward per sample into `.grad`, copied into a
  preallocated `(N, p)` matrix G; then normalise the rows, sum, dot (soft density) or G G^T
  (similarity).
- vmap: plain `torch.func.vmap(grad(f))` over chunks of `VMAP_CHUNK` samples to materialise G,
  then the same dense steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import netsim
from netsim.data.sinusoid import make_sinusoid, sinusoid_mlp
from netsim.outputs import class_vs_rest
from netsim.speedup import mnist_cnn

#: Samples per vmap call of the plain torch.func baseline (netsim's Jacobian engine uses 64).
VMAP_CHUNK = 64
#: Batch size of the training-epoch reference.
EPOCH_BATCH = 128


def cnn_1m(seed: int = 0, n_classes: int = 10) -> nn.Sequential:
    """A >= 1M-parameter CNN for `(B, 3, 32, 32)` inputs (1,295,050 parameters).

    Conv(3->64, 3, pad 1) ReLU Conv(64->64, 3) ReLU MaxPool2 Conv(64->128, 3) ReLU MaxPool2
    Flatten Linear(4608->256) ReLU Linear(256->10). Most parameters (1.18M) sit in the first
    Linear layer, which the layer-wise engine keeps factored.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(128 * 6 * 6, 256), nn.ReLU(), nn.Linear(256, n_classes))


@dataclass
class Bench:
    """One benchmark model with its data.

    Attributes:
        name: key in `MODELS`.
        model: the network in eval mode (no BatchNorm/Dropout here, so train/eval agree).
        inputs: `(N, ...)`.
        targets: `(N,)` integer labels for `output_fn`, or None.
        output_fn: maps the raw output batch (and targets) to `(B, 1)`, or None.
        loss_targets: what the epoch loss compares the raw output with.
        loss: `loss(raw_output, loss_targets) -> scalar`, the plain training loss.
    """

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor | None
    output_fn: Callable | None
    loss_targets: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]

    def subset(self, n: int) -> "Bench":
        return Bench(self.name, self.model, self.inputs[:n], None if self.targets is None else self.targets[:n],
                     self.output_fn, self.loss_targets[:n], self.loss)

    @property
    def n(self) -> int:
        return self.inputs.shape[0]

    def outputs(self, x: Tensor, t: Tensor | None) -> Tensor:
        """`(B, 1)` reduced outputs of a batch."""
        out = self.model(x)
        if self.output_fn is not None:
            out = self.output_fn(out) if t is None else self.output_fn(out, t)
        return out.reshape(x.shape[0], -1)


def _mlp(n: int, seed: int) -> Bench:
    data = make_sinusoid(n, frequency=4, seed=seed)
    return Bench("mlp", sinusoid_mlp(seed=0).eval(), data.inputs, None, None, data.targets,
                 nn.functional.l1_loss)


def _classifier(name: str, model: nn.Module, shape: tuple[int, ...], n: int, seed: int) -> Bench:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return Bench(name, model.eval(), x, labels, class_vs_rest, labels, nn.functional.cross_entropy)


MODELS: dict[str, Callable[[int, int], Bench] | None] = {
    "mlp": _mlp,
    "mnist_cnn": lambda n, seed: _classifier("mnist_cnn", mnist_cnn(0), (1, 28, 28), n, seed),
    "cnn1m": lambda n, seed: _classifier("cnn1m", cnn_1m(0), (3, 32, 32), n, seed),
    "registration": None,  # not yet available
}

DESCRIPTIONS = {
    "mlp": "sinusoid MLP (sinusoid_mlp(), 21k params, input (N, 2), d=1)",
    "mnist_cnn": "MNIST CNN (mnist_cnn(0), 317k params, input (N, 1, 28, 28), class_vs_rest, d=1)",
    "cnn1m": "1.3M-param CNN (bench/models.py cnn_1m, input (N, 3, 32, 32), class_vs_rest, d=1)",
    "registration": "registration network: not yet available",
}


def available_models() -> list[str]:
    return [k for k, v in MODELS.items() if v is not None]


def make_bench(name: str, n: int, seed: int = 0) -> Bench:
    """The model `name` with n seeded samples.

    Raises:
        KeyError: unknown model; NotImplementedError: a model that does not exist yet.
    """
    factory = MODELS[name]
    if factory is None:
        raise NotImplementedError(f"{name}: not yet available")
    return factory(n, seed)


# --------------------------------------------------------------------------- reference work

def epoch(b: Bench, batch: int = EPOCH_BATCH) -> None:
    """The training-epoch reference: forward + backward of the plain loss, batches of `batch`
    over the N samples. No optimizer step (Adam is excluded)."""
    model = b.model
    for start in range(0, b.n, batch):
        out = model(b.inputs[start:start + batch])
        loss = b.loss(out, b.loss_targets[start:start + batch])
        model.zero_grad(set_to_none=True)
        loss.backward()
    model.zero_grad(set_to_none=True)


def naive_grads(b: Bench) -> Tensor:
    """The authors' method: one backward per sample, `(N, p)` G (d = 1)."""
    params = list(netsim.trainable_parameters(b.model).values())
    p = sum(q.numel() for q in params)
    G = torch.empty(b.n, p)
    for i in range(b.n):
        t = None if b.targets is None else b.targets[i:i + 1]
        out = b.outputs(b.inputs[i:i + 1], t)
        for q in params:
            q.grad = None
        out.sum().backward()
        torch.cat([q.grad.reshape(-1) for q in params], out=G[i])
    for q in params:
        q.grad = None
    return G


def vmap_grads(b: Bench, chunk: int = VMAP_CHUNK) -> Tensor:
    """Plain torch.func: `vmap(grad(f))` over chunks, `(N, p)` G (d = 1)."""
    params = {k: v.detach() for k, v in netsim.trainable_parameters(b.model).items()}
    buffers = dict(b.model.named_buffers())

    def f(prm, x, t):
        out = functional_call(b.model, (prm, buffers), (x.unsqueeze(0),))
        if b.output_fn is not None:
            out = b.output_fn(out, t.unsqueeze(0)) if b.targets is not None else b.output_fn(out)
        return out.sum()

    per_sample = vmap(grad(f), in_dims=(None, 0, 0))
    targets = b.targets if b.targets is not None else torch.zeros(b.n)
    p = sum(q.numel() for q in params.values())
    G = torch.empty(b.n, p)
    for start in range(0, b.n, chunk):
        g = per_sample(params, b.inputs[start:start + chunk], targets[start:start + chunk])
        torch.cat([g[k].reshape(g[k].shape[0], -1) for k in params], dim=1, out=G[start:start + chunk])
    return G


def normalise_(G: Tensor) -> Tensor:
    """Rows of G divided by their norms, in place (d = 1: K(x,x)^-1/2 J = g / ||g||)."""
    return G.div_(G.norm(dim=1, keepdim=True))


def dense_soft_density(G: Tensor) -> Tensor:
    """N_S from a materialised G (consumed: normalised in place): Q (sum_x' Q(x'))."""
    Q = normalise_(G)
    return Q @ Q.sum(0)


def dense_similarity(G: Tensor) -> Tensor:
    """k^C N x N from a materialised G (consumed): Q Q^T."""
    Q = normalise_(G)
    return Q @ Q.T


def layerwise_grads(b: Bench, chunk: int | None = None) -> Tensor:
    """G materialised from netsim's layer-wise factors (`(N, p)`, d = 1)."""
    from netsim import layerwise
    from netsim.engine import LayerwiseEngine
    engine = LayerwiseEngine(b.model, b.output_fn, chunk)
    return torch.cat([layerwise.materialise(rep)[:, 0] for _, rep in engine.chunks(b.inputs, b.targets)])


def ours_soft_density(b: Bench, method: str) -> Tensor:
    return netsim.soft_density(b.model, b.inputs, output_fn=b.output_fn, targets=b.targets, method=method)


def ours_similarity(b: Bench, method: str) -> Tensor:
    return netsim.similarity(b.model, b.inputs, output_fn=b.output_fn, x_targets=b.targets,
                             kind="correlation", reduce="trace", method=method)


def ours_grads(b: Bench) -> Tensor:
    return netsim.per_sample_grads(b.model, b.inputs, output_fn=b.output_fn, targets=b.targets)[:, 0]


#: Optional peer libraries (never installed into .venv by the bench: they may pin another torch).
PEERS = {"backpack": "backpack-for-pytorch", "opacus": "opacus", "nngeometry": "nngeometry", "captum": "captum"}
