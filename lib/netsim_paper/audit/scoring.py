"""Suspicion scores of the label audit: "higher = more likely mislabelled".

- `label_disagreement`: the fraction of a sample's k neighbours whose label differs from its own,
  for neighbours under any similarity (k^C or k^I from `netsim.SimilarityIndex.neighbours`, or
  `euclidean_neighbours` of embeddings or pixels);
- `per_sample_loss`: the cross-entropy of the trained network at the sample's own label.

Example:
    >>> import torch
    >>> labels = torch.tensor([0, 0, 0, 1])
    >>> neighbours = torch.tensor([[1, 2], [0, 2], [0, 1], [0, 1]])
    >>> label_disagreement(labels, neighbours).tolist()
    [0.0, 0.0, 0.0, 1.0]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

#: Queries per block of `euclidean_neighbours` (a block holds a (block, N) distance matrix).
KNN_BLOCK = 512


def label_disagreement(labels: Tensor, neighbours: Tensor, query_labels: Tensor | None = None) -> Tensor:
    """Fraction of each query's neighbours whose label differs from the query's.

    Args:
        labels: `(N,)` integer labels of the indexed samples.
        neighbours: `(Q, k)` indices into `labels` of each query's neighbours.
        query_labels: `(Q,)` the queries' own labels; default `labels` (queries = the samples, Q = N).

    Returns:
        `(Q,)` float64 in [0, 1].

    Raises:
        ValueError: shapes that do not match, indices out of range.
    """
    labels = torch.as_tensor(labels)
    neighbours = torch.as_tensor(neighbours, dtype=torch.long)
    own = labels if query_labels is None else torch.as_tensor(query_labels)
    if labels.ndim != 1 or neighbours.ndim != 2 or neighbours.shape[1] == 0 or own.shape != neighbours.shape[:1]:
        raise ValueError(f"need labels (N,), neighbours (Q, k >= 1) and query labels (Q,), got {tuple(labels.shape)}, "
                         f"{tuple(neighbours.shape)} and {tuple(own.shape)}")
    if neighbours.numel() and (neighbours.min() < 0 or neighbours.max() >= len(labels)):
        raise ValueError(f"neighbour indices must lie in [0, {len(labels)})")
    return (labels[neighbours] != own[:, None]).double().mean(1)


def per_sample_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """`(N,)` cross-entropy of `(N, C)` logits at the `(N,)` labels (the network's own suspicion)."""
    return nn.functional.cross_entropy(logits, labels, reduction="none")


@torch.no_grad()
def euclidean_neighbours(features: Tensor, k: int, *, queries: Tensor | None = None,
                         block: int = KNN_BLOCK) -> tuple[Tensor, Tensor]:
    """The k nearest samples in Euclidean distance, streamed over blocks of queries (never N x N).

    Args:
        features: `(N, ...)` one feature array per sample (flattened).
        k: neighbours per query.
        queries: `(Q, ...)` query features; default: the samples themselves, each excluding itself
            (by index, so exact duplicates of a sample still count as its neighbours).
        block: queries per block.

    Returns:
        `(values, indices)`, both `(Q, k)`, nearest first, values = minus the distances (as
        `SimilarityIndex.query`: higher = more similar).

    Raises:
        ValueError: k out of range, feature sizes that do not match.
    """
    flat = features.reshape(len(features), -1).float()
    own = queries is None
    query_flat = flat if own else queries.reshape(len(queries), -1).float()
    if query_flat.shape[1] != flat.shape[1]:
        raise ValueError(f"queries have {query_flat.shape[1]} features per sample, the samples {flat.shape[1]}")
    available = len(flat) - (1 if own else 0)
    if isinstance(k, bool) or not 1 <= k <= available:
        raise ValueError(f"k must lie in [1, {available}], got {k!r}")
    sq_norms = flat.pow(2).sum(1)
    values, indices = [], []
    for start in range(0, len(query_flat), block):
        q = query_flat[start:start + block]
        # |q - x|^2 = |q|^2 - 2 q.x + |x|^2, one matrix product per block
        dist2 = (q.pow(2).sum(1, keepdim=True) - 2 * q @ flat.T + sq_norms).clamp_min_(0)
        if own:
            rows = torch.arange(len(q))
            dist2[rows, rows + start] = float("inf")
        d, i = torch.topk(dist2, k, dim=1, largest=False)
        values.append(-d.sqrt())
        indices.append(i)
    return torch.cat(values), torch.cat(indices)
