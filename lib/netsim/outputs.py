"""Ready-made `output_fn`s: what "the output" of a network means for the kernels.

Each maps the raw model output batch (plus per-sample targets when needed) to `(B, d)`. Each
takes logits as a tensor or inside a Hugging Face `ModelOutput` (anything with a `.logits`
field, or a dict with a "logits" key), so a `transformers` model needs no wrapper:

    >>> # netsim.similarity(bert, batches, output_fn=outputs.logits)                  # a classifier
    >>> # netsim.similarity(gpt2, batches, output_fn=outputs.causal_lm_log_likelihood,
    >>> #                   targets_key="labels")                                     # a language model
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

#: The label that marks a token out of the loss (Hugging Face's and `cross_entropy`'s convention).
IGNORE_INDEX = -100


def logits(out) -> Tensor:
    """The logits of a model output: `out.logits` (a Hugging Face `ModelOutput`), `out["logits"]`
    (a dict) or `out` itself (a tensor). For a classifier: `(B, C)`, the C outputs of the kernels."""
    if isinstance(out, Tensor):
        return out
    found = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if not isinstance(found, Tensor):
        raise TypeError(f"expected logits: a tensor, or a model output with a .logits tensor (a Hugging Face "
                        f"ModelOutput), got a {type(out).__name__} without one")
    return found


def neg_log_softmax(out) -> Tensor:
    """The paper's classification outputs f^c = -log p(c), `(B, C) -> (B, C)`.

    Their self-kernel K(x, x) has rank <= C - 1 (sum_c p_c grad log p_c = 0); the kernels
    normalise on its range (see `netsim.kernel`).
    """
    return -torch.log_softmax(logits(out), dim=-1)


def _check_labels(logits: Tensor, labels: Tensor) -> Tensor:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected logits (B, C) with C >= 2 classes, got shape {tuple(logits.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"class labels must be integers, got {labels.dtype}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {logits.shape[0]} logit rows")
    return labels.long()


def class_vs_rest(out, labels: Tensor) -> Tensor:
    """Right class vs the rest (section 3): f = log p_c - mean_{c' != c} log p_c', `(B, 1)`.

    Args:
        out: `(B, C)` logits (log-probabilities up to a per-sample constant), or a model output
            holding them (`logits`).
        labels: `(B,)` integer classes c.
    """
    scores = logits(out)
    labels = _check_labels(scores, labels)
    log_p = torch.log_softmax(scores, dim=-1)
    right = log_p.gather(1, labels[:, None])
    rest = (log_p.sum(1, keepdim=True) - right) / (log_p.shape[1] - 1)
    return right - rest


def class_vs_adversary(out, pairs: Tensor) -> Tensor:
    """Right class vs a sampled adversary class (section 3): f = log p_cR - log p_cA, `(B, 1)`.

    Args:
        out: `(B, C)` logits, or a model output holding them (`logits`).
        pairs: `(B, 2)` integer (right class, adversary class), e.g. from `sample_adversary`.
    """
    scores = logits(out)
    pairs = _check_labels(scores, pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (B, 2) = (right class, adversary class), got {tuple(pairs.shape)}")
    log_p = torch.log_softmax(scores, dim=-1)
    return log_p.gather(1, pairs[:, :1]) - log_p.gather(1, pairs[:, 1:])


def sample_adversary(labels: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """Draws one adversary class c_A != c_R per sample, uniformly: `(B,) -> (B, 2)` pairs."""
    if num_classes < 2:
        raise ValueError("an adversary class needs at least 2 classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator, device=labels.device)
    return torch.stack([labels, (labels + shift) % num_classes], dim=1)


def causal_lm_log_likelihood(out, labels: Tensor) -> Tensor:
    """A causal language model's mean log-likelihood of each sequence's real tokens, `(B, 1)`:
    f = mean over t of log p(labels[t + 1] | tokens <= t), over the positions whose next label is
    not `IGNORE_INDEX` (padding; `lm_labels` builds such labels from ids and mask).

    Args:
        out: `(B, T, V)` next-token logits, or a model output holding them (`logits`).
        labels: `(B, T)` integer token ids aligned with the inputs (Hugging Face's `labels`
            convention: the shift by one happens here), `IGNORE_INDEX` where no loss is wanted.

    Raises:
        ValueError: shapes that do not match; a sequence with no real token to predict (fewer
            than two real tokens), whose mean would be undefined.
    """
    scores = logits(out)
    if scores.ndim != 3 or labels.shape != scores.shape[:2]:
        raise ValueError(f"expected (B, T, V) logits and (B, T) labels, got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"token labels must be integers, got {labels.dtype}")
    target = labels[:, 1:].long()
    real = target != IGNORE_INDEX
    counts = real.sum(1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"sequence(s) {rows[:20]} have no real token to predict (fewer than two tokens that are "
                         f"not {IGNORE_INDEX}): their mean log-likelihood is undefined")
    log_p = torch.log_softmax(scores[:, :-1], dim=-1)
    picked = log_p.gather(2, target.clamp_min(0).unsqueeze(2)).squeeze(2)
    return ((picked * real).sum(1) / counts).unsqueeze(1)


def lm_labels(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Labels for `causal_lm_log_likelihood`: the ids, with `IGNORE_INDEX` where the mask is 0."""
    if attention_mask is None:
        return input_ids.clone()
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} and input_ids {tuple(input_ids.shape)} "
                         "must have the same shape")
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
