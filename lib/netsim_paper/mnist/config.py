"""The smoke and paper settings of Fig. 5's MNIST speed-up (notebook 03). Registered in
`netsim_paper.config`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class MnistSpeedupConfig:
    """Fig. 5 (section 5): paired training runs with and without a similarity-enforcing criterion.

    The authors: 60 paired runs, 513 steps, 1000 validation images after every step -- ~12 h of
    validation alone on 2 cores; the paper profile keeps the figure's 150 steps and measures on
    the schedule below (see notebook 03).

    Attributes:
        runs: paired runs per arm.
        steps: training steps per run.
        n_b: the criterion's batch of examples (n_B).
        arms: the criteria compared ("ce" is plain cross-entropy).
        eval_early_every, eval_early_until, eval_late_every: the evaluation schedule (every
            `eval_early_every` steps up to `eval_early_until`, then every `eval_late_every`).
        eval_size: random test images per evaluation.
        large_n_b, large_n_b_runs, large_n_b_arms: the second experiment, with a larger n_B.
        lr: learning rate.
        n_boot: bootstrap resamples.
    """

    #: Bump whenever a code constant that shapes a cached result of this experiment changes.
    RECIPE: ClassVar[int] = 1
    SMOKE: ClassVar[MnistSpeedupConfig]
    PAPER: ClassVar[MnistSpeedupConfig]

    runs: int
    steps: int
    n_b: int
    arms: tuple[str, ...]
    eval_early_every: int
    eval_early_until: int
    eval_late_every: int
    eval_size: int
    large_n_b: int
    large_n_b_runs: int
    large_n_b_arms: tuple[str, ...]
    lr: float
    n_boot: int


MnistSpeedupConfig.SMOKE = MnistSpeedupConfig(
    runs=4, steps=40, n_b=1, arms=("ce", "paper", "neg_cos", "pos_cos"), eval_early_every=4, eval_early_until=40,
    eval_late_every=10, eval_size=200, large_n_b=8, large_n_b_runs=2, large_n_b_arms=("ce", "paper"), lr=1e-3,
    n_boot=1000)
MnistSpeedupConfig.PAPER = MnistSpeedupConfig(
    runs=24, steps=150, n_b=1, arms=("ce", "paper", "neg_cos", "pos_cos"), eval_early_every=2, eval_early_until=60,
    eval_late_every=10, eval_size=400, large_n_b=8, large_n_b_runs=12, large_n_b_arms=("ce", "paper"), lr=1e-3,
    n_boot=10000)
