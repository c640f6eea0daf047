"""Ready-made `output_fn`s: what "the output" of a network means for the kernels.

Each maps the raw model output batch (plus per-sample targets when needed) to `(B, d)`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def neg_log_softmax(logits: Tensor) -> Tensor:
    """The paper's classification outputs f^c = -log p(c), `(B, C) -> (B, C)`.

    Their self-kernel K(x, x) has rank <= C - 1 (sum_c p_c grad log p_c = 0); the kernels
    normalise on its range (see `netsim.kernel`).
    """
    return -torch.log_softmax(logits, dim=-1)


def _check_labels(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected logits (B, C) with C >= 2 classes, got shape {tuple(logits.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"class labels must be integers, got {labels.dtype}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} logit rows")
    return labels.long()


def class_vs_rest(logits: Tensor, labels: Tensor) -> Tensor:
    """Right class vs the rest (section 3): f = log p_c - mean_{c' != c} log p_c', `(B, 1)`.

    Args:
        logits: `(B, C)` scores (log-probabilities up to a per-sample constant).
        labels: `(B,)` integer classes c.
    """
    labels = _check_labels(logits, labels)
    log_p = torch.log_softmax(logits, dim=-1)
    right = log_p.gather(1, labels[:, None])
    rest = (log_p.sum(1, keepdim=True) - right) / (log_p.shape[1] - 1)
    return right - rest


def class_vs_adversary(logits: Tensor, pairs: Tensor) -> Tensor:
    """Right class vs a sampled adversary class (section 3): f = log p_cR - log p_cA, `(B, 1)`.

    Args:
        logits: `(B, C)` scores.
        pairs: `(B, 2)` integer (right class, adversary class), e.g. from `sample_adversary`.
    """
    pairs = _check_labels(logits, pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (B, 2) = (right class, adversary class), got {tuple(pairs.shape)}")
    log_p = torch.log_softmax(logits, dim=-1)
    return log_p.gather(1, pairs[:, :1]) - log_p.gather(1, pairs[:, 1:])


def sample_adversary(labels: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """Draws one adversary class c_A != c_R per sample, uniformly: `(B,) -> (B, 2)` pairs."""
    if num_classes < 2:
        raise ValueError("an adversary class needs at least 2 classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.stack([labels, (labels + shift) % num_classes], dim=1)
