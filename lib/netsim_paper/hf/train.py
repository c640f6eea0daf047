"""Training the Hugging Face models here (AdamW, seeded batch order, in place) and reading them back.

Example:
    >>> from netsim_paper.hf.models import gpt2_lm
    >>> model = gpt2_lm(vocab_size=50, width=16, layers=1, heads=2, length=8)
    >>> ids = torch.randint(3, 50, (20, 8))
    >>> losses = train_lm(model, ids, epochs=1, batch_size=10, lr=1e-3, seed=0)
    >>> len(losses), sequence_losses(model, ids).shape
    (1, torch.Size([20]))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..audit.train import fit

#: Samples per forward pass when only evaluating.
EVAL_BATCH = 256


def train_lm(model: nn.Module, ids: Tensor, *, epochs: int, batch_size: int, lr: float, seed: int,
             progress: bool = False) -> list[float]:
    """A causal language model on `(N, T)` token windows (every token is predicted from those before it).

    Returns:
        The mean training loss (nats per predicted token) of each epoch.
    """
    return fit(model, len(ids), lambda rows: model(input_ids=ids[rows], labels=ids[rows]).loss, _adamw(model, lr),
               epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)


def train_classifier(model: nn.Module, images: Tensor, labels: Tensor, *, epochs: int, batch_size: int, lr: float,
                     seed: int, progress: bool = False) -> list[float]:
    """An image classifier (`model(pixel_values=...).logits`) on the cross-entropy of `(N,)` labels."""
    if len(images) != len(labels):
        raise ValueError(f"need as many labels as images, got {len(labels)} and {len(images)}")
    return fit(model, len(images), lambda rows: nn.functional.cross_entropy(
        model(pixel_values=images[rows]).logits, labels[rows]), _adamw(model, lr),
        epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)


@torch.no_grad()
def sequence_losses(model: nn.Module, ids: Tensor) -> Tensor:
    """`(N,)` each window's mean next-token cross-entropy (nats; exp of it is the window's perplexity)."""
    out = []
    for start in range(0, len(ids), EVAL_BATCH):
        batch = ids[start:start + EVAL_BATCH]
        logits = model(input_ids=batch).logits[:, :-1]
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(loss.mean(1))
    return torch.cat(out)


@torch.no_grad()
def class_logits(model: nn.Module, images: Tensor) -> Tensor:
    """`(N, C)` logits of an image classifier, `EVAL_BATCH` at a time."""
    return torch.cat([model(pixel_values=images[s:s + EVAL_BATCH]).logits for s in range(0, len(images), EVAL_BATCH)])
