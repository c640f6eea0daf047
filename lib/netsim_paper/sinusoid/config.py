"""The smoke and paper settings of the sinusoid experiments: the kernel tour (notebook 00) and
Fig. 4's neighbour counts (notebook 02). Registered in `netsim_paper.config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class KernelTourConfig:
    """Notebook 00: one small MLP fitted to a sinusoid, then its kernels.

    Attributes:
        n_train: training points.
        epochs: full-batch training epochs.
        hidden: hidden width of the MLP.
        lr: Adam learning rate.
        frequency: frequency of the target sinusoid.
    """

    #: Bump whenever a code constant that shapes a cached result of this experiment changes.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[KernelTourConfig]
    PAPER: ClassVar[KernelTourConfig]

    n_train: int
    epochs: int
    hidden: int
    lr: float
    frequency: int


KernelTourConfig.SMOKE = KernelTourConfig(n_train=256, epochs=150, hidden=32, lr=1e-3, frequency=2)
KernelTourConfig.PAPER = KernelTourConfig(n_train=1024, epochs=300, hidden=64, lr=1e-3, frequency=2)


@dataclass(frozen=True)
class SinusoidConfig:
    """Fig. 4 (section 4.3): neighbour counts against the frequency of the fitted sinusoid.

    Attributes:
        n: training points per run.
        frequencies: the sinusoids' frequencies.
        seeds: run seeds (offsets to the notebook's `seed`).
        epochs, lr, batch_size: Adam training of each run.
        hidden, depth: the MLP's width and number of layers.
        taus: thresholds of the hard counts.
        alphas: exponents of the positive counts.
        n_boot: bootstrap resamples of the slopes.
    """

    #: Bump whenever a code constant that shapes a cached result of this experiment changes.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[SinusoidConfig]
    PAPER: ClassVar[SinusoidConfig]

    n: int
    frequencies: tuple[int, ...]
    seeds: tuple[int, ...]
    epochs: int
    lr: float
    batch_size: int
    hidden: int
    depth: int
    taus: tuple[float, ...]
    alphas: tuple[int, ...]
    n_boot: int


SinusoidConfig.SMOKE = SinusoidConfig(
    n=512, frequencies=(1, 4, 16), seeds=(0, 1), epochs=400, lr=1e-3, batch_size=64, hidden=64, depth=5,
    taus=(0.5, 0.9, 0.99), alphas=(2,), n_boot=200)
# The authors' protocol: 160k Adam steps (5000 epochs of 32 batches).
SinusoidConfig.PAPER = SinusoidConfig(
    n=2048, frequencies=(1, 2, 4, 8, 16), seeds=(0, 1, 2, 3, 4), epochs=5000, lr=1e-4, batch_size=64, hidden=64,
    depth=5, taus=(0.5, 0.6, 0.7, 0.8, 0.9, 0.925, 0.95, 0.975, 0.99), alphas=(2, 3, 4), n_boot=2000)
