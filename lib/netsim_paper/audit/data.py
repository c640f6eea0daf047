"""The audited data: a subset of real MNIST and its seeded label flips.

Example:
    >>> import torch
    >>> noisy, flipped = flip_labels(torch.arange(10) % 10, 0.2, seed=0)
    >>> int(flipped.sum()), bool((noisy[flipped] != (torch.arange(10) % 10)[flipped]).all())
    (2, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..mnist.data import N_CLASSES, load_mnist, normalise

#: MNIST's own training split: the first 50000 of `load_mnist`'s 60000 training images (the last
#: 10000 are the pickle's validation split).
N_TRAIN_SPLIT = 50_000


def flip_labels(labels: Tensor, fraction: float, *, seed: int, num_classes: int = N_CLASSES) -> tuple[Tensor, Tensor]:
    """Replace the labels of a random `fraction` of the samples by another class (seeded).

    Exactly `round(fraction * N)` samples are drawn without replacement; each gets a class drawn
    uniformly among the `num_classes - 1` classes other than its own, so every flip is an error.

    Args:
        labels: `(N,)` integer classes in 0..num_classes-1.
        fraction: in [0, 1].
        seed: seed of the NumPy generator; the same seed and labels give the same flips.
        num_classes: number of classes (>= 2).

    Returns:
        noisy labels `(N,)` int64 and the flipped mask `(N,)` bool.

    Raises:
        ValueError: labels that are not a 1-D integer tensor in range, a fraction outside [0, 1].
    """
    if labels.ndim != 1 or torch.is_floating_point(labels) or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got shape {tuple(labels.shape)}, dtype {labels.dtype}")
    if num_classes < 2 or (labels.numel() and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"labels must lie in 0..{num_classes - 1} with num_classes >= 2")
    if isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
    n = labels.numel()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    shift = rng.integers(1, num_classes, size=len(chosen))   # 1..C-1: never the own class
    noisy = labels.long().clone()
    noisy[torch.from_numpy(chosen)] = (noisy[torch.from_numpy(chosen)] + torch.from_numpy(shift)) % num_classes
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.from_numpy(chosen)] = True
    return noisy, flipped


@dataclass(frozen=True, repr=False)
class AuditData:
    """The audit's images and labels.

    Attributes:
        train_images: `(N, 1, 28, 28)` normalised training images.
        train_labels: `(N,)` their true labels.
        noisy_labels: `(N,)` the labels the network is trained on (`flip_labels`).
        flipped: `(N,)` bool, where `noisy_labels` differ from `train_labels`.
        test_images: `(Q, 1, 28, 28)` normalised test images.
        test_labels: `(Q,)` their labels.
    """

    train_images: Tensor
    train_labels: Tensor
    noisy_labels: Tensor
    flipped: Tensor
    test_images: Tensor
    test_labels: Tensor

    def __repr__(self) -> str:
        return (f"AuditData({len(self.train_labels)} training images, {int(self.flipped.sum())} labels flipped, "
                f"{len(self.test_labels)} test images)")


def audit_data(n_train: int, n_test: int, flip_fraction: float, *, seed: int) -> AuditData:
    """The first `n_train` images of MNIST's 50k training split with flipped labels, and `n_test` test images.

    Raises:
        ValueError: `n_train` outside 1..50000 or `n_test` outside 1..10000.
    """
    mnist = load_mnist()
    if not 1 <= n_train <= N_TRAIN_SPLIT or not 1 <= n_test <= len(mnist.test_labels):
        raise ValueError(f"need 1 <= n_train <= {N_TRAIN_SPLIT} and 1 <= n_test <= {len(mnist.test_labels)}, "
                         f"got n_train={n_train}, n_test={n_test}")
    labels = mnist.train_labels[:n_train]
    noisy, flipped = flip_labels(labels, flip_fraction, seed=seed)
    return AuditData(normalise(mnist.train_images[:n_train]), labels, noisy, flipped,
                     normalise(mnist.test_images[:n_test]), mnist.test_labels[:n_test])
