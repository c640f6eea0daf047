"""Fig. 5's numbers from the validation curves of paired runs: accuracy at the paper's steps, steps
to an accuracy level, and paired differences to the baseline arm "ce".

Accuracies come in [0, 1] (`speedup.ArmsResult`) and leave in percent, as the paper plots them.
"""

from __future__ import annotations

from collections.abc import Iterable

from .. import stats
from . import paper
from .speedup import ArmsResult, steps_to_reach

#: Accuracy levels (%) whose crossing steps are reported.
LEVELS: tuple[int, ...] = (30, 40, 50, 60, 70)


def arm_summary(result: ArmsResult, arms: Iterable[str], *, at_steps: Iterable[int] = paper.STEPS,
                levels: Iterable[float] = LEVELS) -> dict[str, dict]:
    """The mean validation curve over runs of each arm, summarised.

    Args:
        result: the arms' curves.
        arms: which arms to summarise.
        at_steps: steps where the mean accuracy is read (those not validated are left out).
        levels: accuracy levels (%) for `steps_to`.

    Returns:
        arm -> {"acc_at": {str(step): mean accuracy (%)}, "steps_to": {str(level): first step
        the mean curve reaches it, interpolated, or None}, "final_acc": mean accuracy (%) at the
        last validation}.
    """
    steps = list(result.eval_steps)
    out = {}
    for arm in arms:
        mean = (100 * result.accuracy[arm]).mean(0)
        out[arm] = {
            "acc_at": {str(s): float(mean[steps.index(s)]) for s in at_steps if s in steps},
            "steps_to": {str(level): steps_to_reach(mean, result.eval_steps, level) for level in levels},
            "final_acc": float(mean[-1]),
        }
    return out


def paired_to_baseline(result: ArmsResult, arm: str, step: int, *, n_boot: int, seed: int) -> dict[str, float]:
    """Accuracy of `arm` minus that of "ce" in the same run at validation step `step` (points), with a
    percentile bootstrap interval of the mean over runs (`netsim_paper.stats.paired_difference`).

    Raises:
        ValueError: `step` was not validated.
    """
    steps = list(result.eval_steps)
    if step not in steps:
        raise ValueError(f"step {step} was not validated; validation steps: {steps}")
    i = steps.index(step)
    return stats.paired_difference(100 * result.accuracy[arm][:, i], 100 * result.accuracy["ce"][:, i],
                                   n_boot=n_boot, seed=seed)


def format_steps(steps: float | None) -> str:
    """A `steps_to` value for tables: the rounded step, or "never"."""
    return "never" if steps is None else f"{steps:.0f}"
