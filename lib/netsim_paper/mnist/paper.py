"""What the paper reports for the MNIST speed-up (section 5, Fig. 5), each with where it was read.

The accuracies are digitised from Fig. 5: validation accuracy (%, y-axis) against the number of
mini-batches presented to the network (x-axis), for the curves without ("ce") and with ("paper")
the similarity criterion, read at the x-axis positions in `STEPS`. The paper's text gives no
number for this experiment.
"""

from __future__ import annotations

#: Mini-batch counts (Fig. 5's x-axis) at which the curves were read.
STEPS: tuple[int, ...] = (10, 20, 30, 40, 60, 100, 140)

#: Validation accuracy (%) at `STEPS`, digitised from Fig. 5: arm -> one value per step.
ACCURACY: dict[str, tuple[float, ...]] = {
    "ce": (18.8, 26.0, 38.3, 46.0, 58.5, 71.5, 75.8),
    "paper": (27.2, 36.4, 48.0, 55.0, 65.1, 72.7, 76.3),
}

#: Mini-batches until the mean curve first reaches 50% and 60% accuracy, read off Fig. 5 where
#: each curve crosses those levels: arm -> {level (%): steps}.
STEPS_TO: dict[str, dict[int, int]] = {"ce": {50: 44, 60: 63}, "paper": {50: 33, 60: 51}}

#: The authors' protocol in their released code (`nabla_sim_mnist`): paired runs per arm,
#: training steps per run, and test images validated after every step.
RUNS: int = 60
RUN_STEPS: int = 513
EVAL_SIZE: int = 1000


def accuracy_gap(step: int) -> float:
    """The digitised gain of the criterion over the baseline at `step` (accuracy points).

    Raises:
        ValueError: `step` is not one of `STEPS`.
    """
    if step not in STEPS:
        raise ValueError(f"Fig. 5 was digitised at steps {STEPS}, not {step}")
    i = STEPS.index(step)
    return ACCURACY["paper"][i] - ACCURACY["ce"][i]
