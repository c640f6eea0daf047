"""Nearest neighbours under any similarity, and scores of how good those neighbours are.

The paper shows neighbour patches as pictures (Fig. 6; the poster compares them with a
perceptual-loss similarity). Pictures alone cannot say which similarity is better, so the
scores here measure, for each query, how well its k neighbours share a per-sample attribute
(the true label noise of a patch, its building density, the network's error...) compared
with what random neighbours and the best possible neighbours would give:

- `neighbours`: mean over the k neighbours of ||a_query - a_neighbour||;
- `random`: the exact expectation of that mean for k neighbours drawn uniformly among the
  other samples (no sampling noise), and the standard deviation of such a draw;
- `best`: the same mean for the k samples whose attribute is closest to the query's (an
  oracle that knows the attribute).

`skill = (random - neighbours) / (random - best)` is 0 for neighbours no better than chance
and 1 for the oracle's. Everything takes plain arrays: a `(Q, N)` score matrix (higher =
more similar: a similarity, or a negated distance), `(N,)` / `(N, m)` attributes, `(Q, k)`
neighbour indices.

Example:
    >>> import torch
    >>> scores = -torch.cdist(torch.arange(6.0)[:, None], torch.arange(6.0)[:, None])
    >>> index, value = top_neighbours(scores, k=2)
    >>> index[0].tolist(), index[5].tolist()
    ([1, 2], [4, 3])
    >>> score = neighbour_score(torch.arange(6.0), index, torch.arange(6))
    >>> round(score.summary()["skill"], 6)
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NeighbourScore", "neg_l2_distances", "neighbour_score", "top_neighbours"]


def _query_rows(n_rows: int, n: int, query_index: Tensor | None, what: str) -> Tensor | None:
    if query_index is None:
        return torch.arange(n) if n_rows == n else None
    rows = torch.as_tensor(query_index, dtype=torch.long).flatten().cpu()
    if rows.numel() != n_rows:
        raise ValueError(f"query_index has {rows.numel()} entries for {n_rows} {what}")
    if bool(((rows < 0) | (rows >= n)).any()):
        raise ValueError(f"query_index must lie in [0, {n}), got {rows.min().item()}..{rows.max().item()}")
    return rows


def top_neighbours(scores: Tensor, k: int = 10, *, exclude_self: bool = True,
                   query_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The k highest-scoring samples of each query.

    Args:
        scores: `(Q, N)` similarity or negated distance of each query to every sample
            (higher = more similar).
        k: neighbours per query.
        exclude_self: leave each query's own sample out.
        query_index: `(Q,)` the column of each query's own sample; default: the diagonal when
            Q = N. Needed with `exclude_self` when Q != N.

    Returns:
        indices `(Q, k)` long and their scores `(Q, k)`, best first (ties: lower index first).

    Raises:
        ValueError: NaN scores (naming the rows), k out of range, missing `query_index`.
    """
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be a non-empty (Q, N) matrix, got {tuple(scores.shape)}")
    q, n = scores.shape
    nan_rows = torch.nonzero(torch.isnan(scores).any(1)).flatten()
    if nan_rows.numel():
        raise ValueError(f"scores contain NaN in rows {nan_rows.tolist()[:20]}")
    rows = _query_rows(q, n, query_index, "score rows")
    if exclude_self and rows is None:
        raise ValueError(f"scores are {q} x {n} (queries are not the samples): pass query_index "
                         "to exclude each query's own sample, or exclude_self=False")
    available = n - (1 if exclude_self else 0)
    if not 1 <= k <= available:
        excluded = ", self excluded" if exclude_self else ""
        raise ValueError(f"k must lie in [1, {available}] ({n} samples{excluded}), got {k}")
    # A stable descending sort breaks ties by index, which topk does not guarantee.
    order = torch.sort(scores.detach().double().cpu(), dim=1, descending=True, stable=True).indices
    if exclude_self:   # dropped from the order (a -inf score could otherwise tie with it)
        order = order[order != rows[:, None]].reshape(q, n - 1)
    order = order[:, :k]
    return order, scores.detach().cpu().gather(1, order)


def neg_l2_distances(features: Tensor, query_index: Tensor | None = None, *, batch_size: int = 1024) -> Tensor:
    """`(Q, N)` minus the Euclidean distance between flattened features (a "similarity").

    Args:
        features: `(N, ...)` one feature array per sample (flattened here).
        query_index: `(Q,)` rows used as queries (default: all N).
        batch_size: columns per distance block (bounds the temporaries).
    """
    if features.ndim < 1 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, ...) array, got {tuple(features.shape)}")
    flat = features.reshape(features.shape[0], -1).double()
    if query_index is None:
        rows = torch.arange(flat.shape[0])
    else:
        rows = torch.as_tensor(query_index, dtype=torch.long).flatten()
    rows = _query_rows(rows.numel(), flat.shape[0], rows, "queries")
    queries = flat[rows]
    return -torch.cat([torch.cdist(queries, flat[s:s + batch_size]) for s in range(0, flat.shape[0], batch_size)], 1)


def _as_attribute(values: Tensor) -> Tensor:
    values = torch.as_tensor(values).detach().cpu().double()
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"attribute values must be (N,) or (N, m), got {tuple(values.shape)}")
    return values


@dataclass
class NeighbourScore:
    """How well neighbours share an attribute, per query (all `(Q,)`, attribute units).

    Attributes:
        neighbours: mean ||a_q - a_j|| over the query's neighbours j (NaN attributes skipped).
        random: expectation of that mean for k uniformly random other samples.
        random_sd: standard deviation of that mean for one random draw of k samples (without
            replacement) -- the scale of chance fluctuations of `neighbours`.
        best: the mean for the k samples with the closest attribute (oracle).
        k: neighbours per query.
    """

    neighbours: Tensor
    random: Tensor
    random_sd: Tensor
    best: Tensor
    k: int

    def summary(self) -> dict[str, float]:
        """Means over the queries (NaN queries skipped), the skill and a z-score against chance.

        `skill` = (random - neighbours) / (random - best) of the means: 0 = chance, 1 = oracle.
        `z` = (random - neighbours) / sd, with sd the standard deviation of the mean over the
        queries of independent random draws: how many chance-sized steps the neighbours beat
        random by. `better_than_random` is the fraction of queries whose neighbours are closer
        than the random expectation.
        """
        ok = ~(torch.isnan(self.neighbours) | torch.isnan(self.random) | torch.isnan(self.best))
        count = int(ok.sum())
        if count == 0:
            raise ValueError("no query has a defined score (all attributes NaN?)")
        nb, rnd, best = (t[ok].mean().item() for t in (self.neighbours, self.random, self.best))
        sd = float(self.random_sd[ok].pow(2).sum().sqrt()) / count
        span = rnd - best
        return {
            "neighbours": nb, "random": rnd, "best": best,
            "skill": (rnd - nb) / span if span > 0 else float("nan"),
            "z": (rnd - nb) / sd if sd > 0 else float("nan"),
            "better_than_random": float((self.neighbours[ok] < self.random[ok]).double().mean()),
            "queries": count, "k": self.k,
        }


def neighbour_score(values: Tensor, neighbours: Tensor, query_index: Tensor) -> NeighbourScore:
    """Scores the neighbours of each query by how close their attribute is to the query's.

    Args:
        values: `(N,)` or `(N, m)` per-sample attribute (NaN = unknown: skipped as a neighbour,
            and a query with an unknown attribute gets NaN scores).
        neighbours: `(Q, k)` neighbour indices (e.g. from `top_neighbours`).
        query_index: `(Q,)` each query's own sample (excluded from the random and best baselines).

    Returns:
        `NeighbourScore`.
    """
    a = _as_attribute(values)
    n = a.shape[0]
    neighbours = torch.as_tensor(neighbours, dtype=torch.long).cpu()
    if neighbours.ndim != 2 or neighbours.shape[0] == 0 or neighbours.shape[1] == 0:
        raise ValueError(f"neighbours must be a non-empty (Q, k) index matrix, got {tuple(neighbours.shape)}")
    q, k = neighbours.shape
    rows = _query_rows(q, n, query_index, "neighbour rows")
    if bool(((neighbours < 0) | (neighbours >= n)).any()):
        raise ValueError(f"neighbour indices must lie in [0, {n})")
    known = ~torch.isnan(a).any(1)                                   # (N,)
    distance = torch.cdist(a[rows].nan_to_num(), a.nan_to_num())     # (Q, N)
    distance[:, ~known] = math.nan
    distance[~known[rows]] = math.nan
    nb = distance.gather(1, neighbours)
    nb_mean = nb.nanmean(1)
    others = distance.clone()
    others[torch.arange(q), rows] = math.nan                         # the query itself is no candidate
    valid = ~torch.isnan(others)
    m = valid.sum(1).double()
    mean = others.nanmean(1)
    var = ((others - mean[:, None]) ** 2).nansum(1) / m.clamp_min(1)
    # The mean of k draws without replacement from m values: variance var / k * (m - k) / (m - 1).
    kk = torch.minimum(torch.full_like(m, k), m)
    sd = torch.sqrt(var / kk.clamp_min(1) * ((m - kk) / (m - 1).clamp_min(1)).clamp_min(0))
    best = torch.sort(others.nan_to_num(math.inf), dim=1).values[:, :k]
    best = torch.where(torch.isinf(best), torch.full_like(best, math.nan), best).nanmean(1)
    undefined = ~known[rows] | (m == 0)
    for t in (mean, sd, best, nb_mean):
        t[undefined] = math.nan
    return NeighbourScore(neighbours=nb_mean, random=mean, random_sd=sd, best=best, k=k)
