"""The sinusoid toy problem of Section 4.3 (the authors' protocol).

A sample is a position alpha ~ U[0, 1) on the unit circle, the input is the point
x = (cos 2 pi alpha, sin 2 pi alpha) and the target is sin(2 pi f alpha). Raising the
frequency f keeps the number of samples fixed but makes the function harder to fit, so
the network must tell closer inputs apart: the paper finds neighbour counts falling like
1/f. The network is Linear(2, 64), 5 x Linear(64, 64), Linear(64, 1) with ReLUs between
(21,057 parameters, PyTorch default init), trained with Adam (lr 1e-4), L1 loss, batch
64, 5000 epochs on N = 2048 samples.

Example:
    >>> from netsim_paper.sinusoid.data import make_sinusoid, sinusoid_mlp
    >>> data = make_sinusoid(frequency=4, seed=0)
    >>> data.inputs.shape, data.targets.shape
    (torch.Size([2048, 2]), torch.Size([2048, 1]))
    >>> sum(p.numel() for p in sinusoid_mlp(seed=0).parameters())
    21057
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..runtime import build_seeded
from .stacked import train_stacked

__all__ = [
    "RunSeeds",
    "SinusoidData",
    "SinusoidRun",
    "make_sinusoid",
    "run_seeds",
    "runs_from_plain",
    "runs_to_plain",
    "sinusoid_mlp",
    "target_curvature",
    "train_sinusoid_ensemble",
]


@dataclass(frozen=True)
class SinusoidData:
    """One sampled sinusoid data set.

    Attributes:
        alpha: (N,) float64 positions in [0, 1), in sampling order (not sorted).
        inputs: (N, 2) float32 points (cos 2 pi alpha, sin 2 pi alpha) on the unit circle.
        targets: (N, 1) float32 values sin(2 pi f alpha).
        frequency: f.
        seed: the seed alpha was drawn with.
    """

    alpha: Tensor
    inputs: Tensor
    targets: Tensor
    frequency: float
    seed: int

    def to(self, device: torch.device | str) -> SinusoidData:
        """The same data on another device."""
        return SinusoidData(self.alpha.to(device), self.inputs.to(device),
                            self.targets.to(device), self.frequency, self.seed)

    def to_plain(self) -> dict[str, Any]:
        """The data set as a dict of tensors and numbers (see `SinusoidRun.to_plain`)."""
        return {"alpha": self.alpha, "inputs": self.inputs, "targets": self.targets,
                "frequency": self.frequency, "seed": self.seed}

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> SinusoidData:
        """Inverse of `to_plain`."""
        return cls(plain["alpha"], plain["inputs"], plain["targets"], float(plain["frequency"]),
                   int(plain["seed"]))


def make_sinusoid(n: int = 2048, *, frequency: float, seed: int = 0) -> SinusoidData:
    """Sample N positions uniformly on the circle and label them with sin(2 pi f alpha).

    Args:
        n: number of samples N.
        frequency: f, the number of periods of the target over one turn of the circle.
        seed: alpha is `torch.rand(n)` from a generator seeded with it; the same seed
            gives the same positions for every frequency.

    Returns:
        A `SinusoidData` with alpha (N,) float64, inputs (N, 2) and targets (N, 1) float32
        (computed in float64, then rounded).
    """
    if n < 1:
        raise ValueError(f"need n >= 1 samples, got {n}")
    generator = torch.Generator().manual_seed(int(seed))
    alpha = torch.rand(n, generator=generator, dtype=torch.float64)
    angle = 2 * math.pi * alpha
    inputs = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1).float()
    targets = torch.sin(frequency * angle).unsqueeze(1).float()
    return SinusoidData(alpha=alpha, inputs=inputs, targets=targets,
                        frequency=float(frequency), seed=int(seed))


def sinusoid_mlp(hidden: int = 64, depth: int = 5, *, seed: int | None = None,
                 in_features: int = 2, out_features: int = 1) -> nn.Sequential:
    """The authors' network: Linear(2, h), depth x Linear(h, h), Linear(h, 1), ReLU between.

    Args:
        hidden: width h of the hidden layers.
        depth: number of hidden-to-hidden Linear(h, h) layers (the authors use 5, giving
            7 Linear layers and 21,057 parameters for h = 64).
        seed: if given, the PyTorch default initialisation is drawn under
            `torch.manual_seed(seed)` in a forked RNG, so the global RNG is left untouched
            and the weights depend on the seed only. None draws from the global RNG.
        in_features, out_features: input and output sizes.

    Returns:
        An `nn.Sequential` of `Linear (ReLU Linear)*`, which `netsim_paper.sinusoid.stacked` trains
        through its fast path.
    """
    def build() -> nn.Sequential:
        layers: list[nn.Module] = [nn.Linear(in_features, hidden)]
        for _ in range(depth):
            layers += [nn.ReLU(), nn.Linear(hidden, hidden)]
        layers += [nn.ReLU(), nn.Linear(hidden, out_features)]
        return nn.Sequential(*layers)

    return build_seeded(build, seed)


def target_curvature(alpha: Tensor, frequency: float) -> Tensor:
    """Local curvature of the target curve alpha -> y = sin(2 pi f alpha).

    kappa(alpha) = |y''| / (1 + y'^2)^(3/2), derivatives with respect to alpha, i.e. the
    curvature of the graph of the target drawn over alpha in [0, 1) (the way the target
    is plotted). y' = 2 pi f cos(2 pi f alpha), y'' = -(2 pi f)^2 sin(2 pi f alpha).
    kappa is 0 at the zero crossings and peaks at (2 pi f)^2 at the extrema, so it grows
    like f^2 where the target turns. (Measured against the angle theta = 2 pi alpha
    instead, every derivative loses a factor 2 pi and kappa changes: the convention
    matters when comparing numbers, not shapes.)

    Args:
        alpha: (...) positions (a tensor, or anything `torch.as_tensor` accepts).
        frequency: f.

    Returns:
        (...) curvature, in alpha's floating dtype (float64 for integer input).
    """
    alpha = torch.as_tensor(alpha)
    if not alpha.is_floating_point():
        alpha = alpha.double()
    omega = 2 * math.pi * frequency
    slope = omega * torch.cos(omega * alpha)
    second = -(omega ** 2) * torch.sin(omega * alpha)
    return second.abs() / (1 + slope ** 2) ** 1.5


# ------------------------------------------------------------------------ ensembles

# Independent random streams per run. Drawing the data and the initial weights from the
# same seed would feed both from one Mersenne-Twister sequence (alpha's uniforms and the
# first layer's uniforms would coincide), so init and shuffle use derived seeds.
_STREAMS = {"init": 1, "shuffle": 2}


@dataclass(frozen=True)
class RunSeeds:
    """The seeds one run draws from: data (alpha), init (weights), shuffle (batch order)."""

    data: int
    init: int
    shuffle: int


def run_seeds(seed: int) -> RunSeeds:
    """The data, init and shuffle seeds of run `seed` (independent, deterministic).

    data is `seed` itself, so `make_sinusoid(frequency=f, seed=seed)` reproduces a run's
    data; init and shuffle come from `numpy.random.SeedSequence([seed, stream])`.
    """
    def derived(stream: int) -> int:
        return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])
    return RunSeeds(data=int(seed), init=derived(_STREAMS["init"]),
                    shuffle=derived(_STREAMS["shuffle"]))


@dataclass
class SinusoidRun:
    """One trained network of a sinusoid ensemble.

    Attributes:
        frequency: f of the target.
        seed: the run seed (see `run_seeds`).
        data: the training set.
        model: the trained `sinusoid_mlp`.
        final_train_l1: mean |model(x) - y| over the whole training set after training.
        epoch_loss: (epochs,) mean L1 loss of each epoch, as seen during training.
    """

    frequency: float
    seed: int
    data: SinusoidData
    model: nn.Sequential
    final_train_l1: float
    epoch_loss: Tensor

    def to_plain(self) -> dict[str, Any]:
        """The run as plain data: tensors, numbers and dicts of them, with the network as its
        `state_dict`. Safe to cache and to load with `torch.load(weights_only=True)`."""
        return {"frequency": self.frequency, "seed": self.seed, "data": self.data.to_plain(),
                "state_dict": dict(self.model.state_dict()), "final_train_l1": self.final_train_l1,
                "epoch_loss": self.epoch_loss}

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> SinusoidRun:
        """Inverse of `to_plain`: the network is rebuilt from its state dict, whose shapes give
        `sinusoid_mlp`'s sizes (the global RNG is left untouched)."""
        state = plain["state_dict"]
        layers = sorted(int(k.split(".")[0]) for k in state if k.endswith(".weight") and k.split(".")[0].isdigit())
        if len(layers) < 2:
            raise ValueError(f"not a sinusoid_mlp state dict: {len(layers)} numbered weight matrices")
        hidden, in_features = state[f"{layers[0]}.weight"].shape
        model = sinusoid_mlp(hidden, len(layers) - 2, seed=0, in_features=in_features,
                             out_features=state[f"{layers[-1]}.weight"].shape[0])
        model.load_state_dict(state)        # strict: names and shapes must match the rebuilt network
        return cls(frequency=float(plain["frequency"]), seed=int(plain["seed"]),
                   data=SinusoidData.from_plain(plain["data"]), model=model,
                   final_train_l1=float(plain["final_train_l1"]), epoch_loss=plain["epoch_loss"])


def runs_to_plain(runs: Sequence[SinusoidRun]) -> list[dict[str, Any]]:
    """`SinusoidRun.to_plain` of every run, e.g. to cache `train_sinusoid_ensemble`'s result."""
    return [run.to_plain() for run in runs]


def runs_from_plain(plain: Sequence[dict[str, Any]]) -> list[SinusoidRun]:
    """Inverse of `runs_to_plain`."""
    return [SinusoidRun.from_plain(p) for p in plain]


def train_sinusoid_ensemble(
    frequencies: Sequence[float],
    seeds: Sequence[int],
    *,
    n: int = 2048,
    epochs: int,
    lr: float = 1e-4,
    batch_size: int = 64,
    hidden: int = 64,
    depth: int = 5,
    device: torch.device | str = "cpu",
    workers: int = 1,
    progress: bool = True,
) -> list[SinusoidRun]:
    """Train one network per (frequency, seed), all at once (`netsim_paper.sinusoid.stacked`).

    Every run is the authors' protocol (Adam, L1 loss) trained as if alone. Seeds pair the
    runs across frequencies: for a given seed every frequency gets the same positions
    alpha (one data set per run, drawn from the run seed, as the authors do), the same
    initial weights and the same batch order, so between frequencies only the target
    changes. Different seeds differ in all three (see `run_seeds`).

    Args:
        frequencies: the target frequencies f.
        seeds: the run seeds.
        n: samples per data set.
        epochs: passes over the data (the authors: 5000, i.e. 160k steps at N=2048, B=64).
        lr: Adam learning rate.
        batch_size: samples per step.
        hidden, depth: the network size (see `sinusoid_mlp`).
        device: where to train; the returned models and data live there.
        workers: CPU threads sharing the models (see `netsim_paper.sinusoid.stacked.train_stacked`); on
            the 2-core machines 2 is as fast as torch.set_num_threads(2) and robust to
            other load. Results do not depend on it.
        progress: show a progress bar.

    Returns:
        One `SinusoidRun` per pair, frequency-major: [(f0, s0), (f0, s1), ..., (f1, s0), ...].
        Deterministic given the arguments (on a given machine and thread count).
    """
    pairs = [(float(f), int(s)) for f in frequencies for s in seeds]
    if not pairs:
        raise ValueError("need at least one frequency and one seed")
    datasets = [make_sinusoid(n, frequency=f, seed=run_seeds(s).data) for f, s in pairs]
    models = [sinusoid_mlp(hidden, depth, seed=run_seeds(s).init) for _, s in pairs]
    inputs = torch.stack([d.inputs for d in datasets]).to(device)
    targets = torch.stack([d.targets for d in datasets]).to(device)
    trained, history = train_stacked(
        models, inputs, targets, loss="l1", lr=lr, batch_size=batch_size, epochs=epochs,
        shuffle_seeds=[run_seeds(s).shuffle for _, s in pairs], workers=workers,
        progress=progress)
    runs = []
    for i, ((f, s), data, model) in enumerate(zip(pairs, datasets, trained)):
        with torch.no_grad():
            final_l1 = (model(inputs[i]) - targets[i]).abs().mean().item()
        runs.append(SinusoidRun(frequency=f, seed=s, data=data.to(device), model=model,
                                final_train_l1=final_l1, epoch_loss=history.epoch_loss[i]))
    return runs
