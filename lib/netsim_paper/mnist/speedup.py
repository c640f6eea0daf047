"""The MNIST speed-up experiment (paper section 5, Fig. 5), vectorised across paired runs.

Protocol (the authors' released code, `nabla_sim_mnist`): each step draws one class uniformly,
then two batches B1, B2 of n_B images of that class (with replacement); the loss is the mean
of the two batches' cross-entropies, plus, in the enforcing arms, a criterion on the batch-mean
gradients mu_1, mu_2 of the binarised output f = log p_c - mean_{c' != c} log p_c'
(`netsim.outputs.class_vs_rest`). Adam, lr 1e-3. Arms:

- "ce": cross-entropy alone (the baseline);
- "paper": + n_B ||mu_1 - mu_2||^2 / (||mu_1|| ||mu_2||), the paper's criterion;
- "neg_cos": + sqrt(n_B) (-cos(mu_1, mu_2));
- "pos_cos": + sqrt(n_B) cos(mu_1, mu_2), the sign of the released code (an ablation). The
  sqrt(n_B) weight is the released code's.

Runs are paired across arms: run r starts from the same weights, sees the same classes and
images, and is validated on the same random test images in every arm, so arm differences can
be measured with paired statistics. The R runs of one arm train at once: parameters are stacked
`(R, ...)`, the per-run loss (itself containing a gradient) is differentiated by
`vmap(grad(loss))`, and Adam on the stacked tensors is exactly R independent Adam runs
(Adam is element-wise; see `netsim_paper.sinusoid.stacked`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from tqdm.auto import tqdm

from netsim.enforce import group_criterion
from netsim.outputs import class_vs_rest

from ..runtime import build_seeded

ARMS = ("ce", "paper", "neg_cos", "pos_cos")


def mnist_cnn(seed: int | None = None, n_classes: int = 10) -> nn.Sequential:
    """The authors' CNN (317,069 parameters), returning logits `(B, 10)` for `(B, 1, 28, 28)`.

    Conv(1->32, 5) PReLU AvgPool2 Conv(32->64, 5) PReLU AvgPool2 Linear(1024->256) PReLU
    Linear(256->10); the log-softmax is applied by the losses. `seed` draws the PyTorch default
    initialisation in a forked RNG (the global RNG is untouched).
    """
    def build():
        return nn.Sequential(
            nn.Conv2d(1, 32, 5), nn.PReLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 64, 5), nn.PReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(64 * 4 * 4, 256), nn.PReLU(), nn.Linear(256, n_classes))
    return build_seeded(build, seed)


def criterion_weight(arm: str, n_b: int) -> float:
    """Weight of the gradient criterion in the loss (the released code: sqrt(n_B) for the cosines)."""
    return 1.0 if arm == "paper" else float(np.sqrt(n_b))


@dataclass
class PairedPlan:
    """Everything random in R paired runs, drawn once and shared by all arms.

    Attributes:
        init_seeds: `(R,)` seeds of the initial weights.
        classes: `(steps, R)` the class of each step.
        batch_indices: `(steps, R, 2, n_B)` training-image indices of B1 and B2.
        eval_steps: `(V,)` steps (1-based: after that many updates) where validation happens.
        eval_indices: `(V, R, eval_size)` test-image indices of each validation.
    """

    init_seeds: np.ndarray
    classes: np.ndarray
    batch_indices: np.ndarray
    eval_steps: np.ndarray
    eval_indices: np.ndarray


def eval_schedule(steps: int, *, early_every: int, early_until: int, late_every: int) -> list[int]:
    """The validation steps: every `early_every` steps from 0 to `early_until`, then every
    `late_every` from `early_until` to `steps` (both ends included where they fall on the grid).

    Example:
        >>> eval_schedule(30, early_every=5, early_until=10, late_every=10)
        [0, 5, 10, 20, 30]
    """
    if min(early_every, late_every) < 1 or not 0 <= early_until <= steps:
        raise ValueError(f"need intervals >= 1 and 0 <= early_until <= steps, got early_every={early_every}, "
                         f"early_until={early_until}, late_every={late_every}, steps={steps}")
    return sorted(set(range(0, early_until + 1, early_every)) | set(range(early_until, steps + 1, late_every)))


def make_plan(train_labels: Tensor, n_test: int, *, runs: int, steps: int, n_b: int,
              eval_steps, eval_size: int, seed: int = 0) -> PairedPlan:
    """Draws the classes, batches and validation subsets of R paired runs (seeded)."""
    labels = np.asarray(train_labels)
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    if any(len(ix) == 0 for ix in by_class):
        raise ValueError("every class needs at least one training image")
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 10, (steps, runs))
    picks = rng.random((steps, runs, 2, n_b))
    batch = np.empty((steps, runs, 2, n_b), dtype=np.int64)
    for c in range(10):
        mask = classes == c
        batch[mask] = by_class[c][(picks[mask] * len(by_class[c])).astype(np.int64)]
    eval_steps = np.asarray(sorted(set(int(s) for s in eval_steps)))
    if eval_steps.min() < 0 or eval_steps.max() > steps:
        raise ValueError(f"eval_steps must lie in [0, {steps}]")
    eval_indices = np.stack([np.stack([rng.choice(n_test, eval_size, replace=False) for _ in range(runs)])
                             for _ in eval_steps])
    return PairedPlan(rng.integers(0, 2**31 - 1, runs), classes, batch, eval_steps, eval_indices)


def _stack(models: list[nn.Module]) -> dict[str, Tensor]:
    return {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).requires_grad_()
            for name, _ in models[0].named_parameters()}


def _run_loss(template: nn.Module, arm: str, n_b: int):
    """Per-run loss `(params, x1, x2, label) -> scalar`, with the criterion's inner gradients.

    One forward pass per batch serves both the cross-entropy and mu: the pullback of that
    forward (a vjp) maps d mean(f) / d logits to mu = d mean(f) / d theta, and stays
    differentiable for the outer gradient (double backprop).
    """
    weight = criterion_weight(arm, n_b)

    def loss(params, x1, x2, label):
        labels = label.expand(x1.shape[0])
        ce, mus = 0.0, []
        for x in (x1, x2):
            logits, pullback = vjp(lambda p, x=x: functional_call(template, p, (x,)), params)
            ce = ce + nn.functional.cross_entropy(logits, labels) / 2
            if arm != "ce":
                d_logits = grad(lambda z: class_vs_rest(z, labels).mean())(logits)
                mus.append(torch.cat([v.flatten() for v in pullback(d_logits)[0].values()]))
        if arm == "ce":
            return ce
        return ce + weight * group_criterion(mus[0], mus[1], n_b, arm)

    return loss


def train_arm(arm: str, plan: PairedPlan, train_images: Tensor, train_labels: Tensor,
              test_images: Tensor, test_labels: Tensor, *, lr: float = 1e-3, runs_per_group: int = 16,
              progress: bool = True) -> dict[str, np.ndarray]:
    """Trains the R paired runs of one arm, `runs_per_group` at a time (vmapped over runs).

    Groups of ~16 runs were measured fastest on CPU: larger vmapped groups make the batched
    (grouped) convolutions slower per run.

    Args:
        arm: one of `ARMS`.
        plan: the shared randomness (`make_plan`).
        train_images, test_images: `(N, 1, 28, 28)` normalised images.
        train_labels, test_labels: `(N,)` int64.

    Returns:
        {"accuracy": (R, V) validation accuracy in [0, 1] at `plan.eval_steps`,
         "loss": (steps, R) training loss of each step,
         "params": {name: (R, ...)} the trained parameters}.
    """
    runs = plan.batch_indices.shape[1]
    parts = [_train_group(arm, _subplan(plan, slice(r, r + runs_per_group)), train_images, train_labels,
                          test_images, test_labels, lr=lr, progress=progress)
             for r in range(0, runs, runs_per_group)]
    return {"accuracy": np.concatenate([p["accuracy"] for p in parts]),
            "loss": np.concatenate([p["loss"] for p in parts], axis=1),
            "params": {k: torch.cat([p["params"][k] for p in parts]) for k in parts[0]["params"]}}


def _subplan(plan: PairedPlan, runs: slice) -> PairedPlan:
    return PairedPlan(plan.init_seeds[runs], plan.classes[:, runs], plan.batch_indices[:, runs],
                      plan.eval_steps, plan.eval_indices[:, runs])


def _train_group(arm: str, plan: PairedPlan, train_images: Tensor, train_labels: Tensor,
                 test_images: Tensor, test_labels: Tensor, *, lr: float,
                 progress: bool) -> dict[str, np.ndarray]:
    """One vmapped group of runs (see `train_arm`)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    steps, runs, _, n_b = plan.batch_indices.shape
    template = mnist_cnn()
    params = _stack([mnist_cnn(int(s)) for s in plan.init_seeds])
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    loss_and_grad = vmap(torch.func.grad_and_value(_run_loss(template, arm, n_b)))
    forward = vmap(lambda p, x: functional_call(template, p, (x,)))
    accuracy = np.zeros((runs, len(plan.eval_steps)))
    losses = np.zeros((steps, runs))
    eval_at = {int(s): v for v, s in enumerate(plan.eval_steps)}

    def validate(v):
        idx = torch.from_numpy(plan.eval_indices[v])
        with torch.no_grad():
            logits = forward({k: p.detach() for k, p in params.items()}, test_images[idx])
        accuracy[:, v] = (logits.argmax(-1) == test_labels[idx]).double().mean(1).numpy()

    if 0 in eval_at:
        validate(eval_at[0])
    for step in tqdm(range(steps), desc=f"arm {arm}", disable=not progress):
        idx = torch.from_numpy(plan.batch_indices[step])
        x = train_images[idx]                                   # (R, 2, n_B, 1, 28, 28)
        labels = torch.from_numpy(plan.classes[step])
        grads, loss = loss_and_grad(params, x[:, 0], x[:, 1], labels)
        if not bool(torch.isfinite(loss).all()):
            raise FloatingPointError(f"arm {arm}: non-finite loss at step {step + 1} in runs "
                                     f"{torch.nonzero(~torch.isfinite(loss)).flatten().tolist()}")
        for name, p in params.items():
            p.grad = grads[name]
        optimizer.step()
        losses[step] = loss.detach().numpy()
        if step + 1 in eval_at:
            validate(eval_at[step + 1])
    return {"accuracy": accuracy, "loss": losses, "params": {k: p.detach() for k, p in params.items()}}


@dataclass(frozen=True)
class ArmsResult:
    """The validation curves of several arms trained on one plan (paired runs).

    Attributes:
        eval_steps: `(V,)` int64, the plan's validation steps.
        accuracy: arm -> `(R, V)` float64 validation accuracy in [0, 1].
        seconds: arm -> wall time of its training and validation.
    """

    eval_steps: np.ndarray
    accuracy: dict[str, np.ndarray]
    seconds: dict[str, float]

    def __post_init__(self):
        for arm, acc in self.accuracy.items():
            if acc.ndim != 2 or acc.shape[1] != len(self.eval_steps):
                raise ValueError(f"arm {arm!r}: accuracy of shape {acc.shape} for {len(self.eval_steps)} eval steps")
            if not (np.isfinite(acc).all() and (acc >= 0).all() and (acc <= 1).all()):
                raise ValueError(f"arm {arm!r}: accuracies must be finite and in [0, 1]")

    def to_plain(self) -> dict[str, Any]:
        """Tensors, floats and dicts of them: safe to cache and to load with
        `torch.load(weights_only=True)`; `from_plain` gives back the same arrays, bit for bit."""
        return {"eval_steps": torch.from_numpy(self.eval_steps),
                "accuracy": {arm: torch.from_numpy(acc) for arm, acc in self.accuracy.items()},
                "seconds": dict(self.seconds)}

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> ArmsResult:
        """Inverse of `to_plain`."""
        return cls(plain["eval_steps"].numpy(), {arm: acc.numpy() for arm, acc in plain["accuracy"].items()},
                   {arm: float(s) for arm, s in plain["seconds"].items()})


def train_arms(arms: Iterable[str], plan: PairedPlan, train_images: Tensor, train_labels: Tensor,
               test_images: Tensor, test_labels: Tensor, *, lr: float = 1e-3, progress: bool = True) -> ArmsResult:
    """`train_arm` for each arm on the same plan, timed; see `train_arm` for the arguments."""
    accuracy, seconds = {}, {}
    for arm in arms:
        t0 = time.perf_counter()
        accuracy[arm] = train_arm(arm, plan, train_images, train_labels, test_images, test_labels, lr=lr,
                                  progress=progress)["accuracy"]
        seconds[arm] = time.perf_counter() - t0
    return ArmsResult(plan.eval_steps, accuracy, seconds)


def steps_to_reach(accuracy: np.ndarray, eval_steps: np.ndarray, level: float) -> float | None:
    """First step where a mean accuracy curve `(V,)` reaches `level`, linearly interpolated
    between evaluated steps; None if it never does."""
    above = np.flatnonzero(accuracy >= level)
    if len(above) == 0:
        return None
    i = above[0]
    if i == 0:
        return float(eval_steps[0])
    a0, a1, s0, s1 = accuracy[i - 1], accuracy[i], eval_steps[i - 1], eval_steps[i]
    return float(s0 + (level - a0) / (a1 - a0) * (s1 - s0))
