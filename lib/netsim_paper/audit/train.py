"""Training the authors' CNN on the (noisy) labels, and what the audit reads from it: logits and
penultimate-layer embeddings.

Example:
    >>> import torch
    >>> from netsim_paper.mnist.speedup import mnist_cnn
    >>> model = mnist_cnn(seed=0)
    >>> images, labels = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    >>> losses = train_classifier(model, images, labels, epochs=1, batch_size=16, lr=1e-3, seed=0)
    >>> len(losses), embeddings(model, images).shape
    (1, torch.Size([32, 256]))
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

#: Inputs per forward pass when only evaluating (bounds the activations' memory).
EVAL_BATCH = 1000


def train_classifier(model: nn.Module, images: Tensor, labels: Tensor, *, epochs: int, batch_size: int, lr: float,
                     seed: int, progress: bool = False) -> list[float]:
    """Plain training: Adam on the mean cross-entropy, shuffled mini-batches (seeded), in place.

    Args:
        model: maps `(B, ...)` to logits `(B, C)`; trained in place.
        images: `(N, ...)` inputs.
        labels: `(N,)` int64 targets (here the possibly flipped labels).
        epochs, batch_size, lr: the schedule; the last batch of an epoch may be smaller.
        seed: seed of the batch order (the weights' initialisation is the model's own).
        progress: show a progress bar per epoch.

    Returns:
        The mean training loss of each epoch.

    Raises:
        ValueError: mismatched lengths, non-positive epochs or batch size.
        FloatingPointError: a non-finite loss.
    """
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {len(images)} and {len(labels)}")
    return fit(model, len(labels), lambda rows: nn.functional.cross_entropy(model(images[rows]), labels[rows]),
               torch.optim.Adam(model.parameters(), lr=lr), epochs=epochs, batch_size=batch_size, seed=seed,
               progress=progress)


def fit(model: nn.Module, n: int, loss_of: Callable[[Tensor], Tensor], optimizer: torch.optim.Optimizer, *,
        epochs: int, batch_size: int, seed: int, progress: bool = False) -> list[float]:
    """The training loop of every model trained here: shuffled mini-batches of the `n` samples (a
    seeded order per epoch), `loss_of(rows)` a batch's mean loss, one `optimizer` step per batch;
    the model in train mode while it runs, in eval mode after.

    Returns:
        The mean training loss of each epoch.

    Raises:
        ValueError: non-positive epochs, batch size or sample count.
        FloatingPointError: a non-finite loss.
    """
    if epochs < 1 or batch_size < 1 or n < 1:
        raise ValueError(f"epochs, batch_size and the sample count must be >= 1, got {epochs}, {batch_size}, {n}")
    generator = torch.Generator().manual_seed(seed)
    model.train()
    means = []
    try:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in tqdm(range(0, n, batch_size), desc=f"epoch {epoch + 1}", disable=not progress):
                rows = order[start:start + batch_size]
                loss = loss_of(rows)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}, batch at {start}")
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
            means.append(total / n)
    finally:
        model.eval()
    return means


@torch.no_grad()
def logits(model: nn.Module, images: Tensor) -> Tensor:
    """`(N, C)` outputs of `model` for `(N, ...)` inputs, `EVAL_BATCH` at a time."""
    return torch.cat([model(images[s:s + EVAL_BATCH]) for s in range(0, len(images), EVAL_BATCH)])


@torch.no_grad()
def embeddings(model: nn.Sequential, images: Tensor) -> Tensor:
    """`(N, h)` penultimate-layer features: the input of the last layer of a Sequential classifier."""
    if not isinstance(model, nn.Sequential) or len(model) < 2:
        raise TypeError(f"embeddings needs an nn.Sequential whose last module is the classifier, got "
                        f"{type(model).__name__}")
    return logits(model[:-1], images)


def out_of_fold_probabilities(build: Callable[[int], nn.Module], images: Tensor, labels: Tensor, *, folds: int,
                              seed: int, **training) -> Tensor:
    """Each sample's class probabilities from a model that never trained on it (k-fold, seeded).

    Confident learning (cleanlab) needs such out-of-sample probabilities: a model's probability
    of a label it was trained on says little about whether the label is right.

    Args:
        build: `build(fold)` returns a fresh model for fold `fold` (0..folds-1).
        images: `(N, ...)` inputs; labels: `(N,)` int64 (possibly noisy) labels.
        folds: number of folds (>= 2); the samples are split by a seeded permutation.
        seed: seed of the split; fold f trains with seed `seed + 1 + f`.
        **training: `epochs`, `batch_size`, `lr` of `train_classifier`.

    Returns:
        `(N, C)` softmax probabilities.
    """
    if folds < 2 or folds > len(labels):
        raise ValueError(f"folds must lie in [2, {len(labels)}], got {folds}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    probabilities = None
    for fold, held_out in enumerate(torch.tensor_split(order, folds)):
        kept = torch.ones(len(labels), dtype=torch.bool)
        kept[held_out] = False
        model = build(fold)
        train_classifier(model, images[kept], labels[kept], seed=seed + 1 + fold, **training)
        fold_probabilities = torch.softmax(logits(model, images[held_out]), dim=1)
        if probabilities is None:
            probabilities = torch.empty(len(labels), fold_probabilities.shape[1])
        probabilities[held_out] = fold_probabilities
    return probabilities
