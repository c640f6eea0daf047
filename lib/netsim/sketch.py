"""Seeded random projections of per-sample Jacobians in their layer-wise form (for `SimilarityIndex`).

A sketch maps each sample's Jacobian J `(d, p)` to J P^T `(d, k)` with a random P `(k, p)` whose
E[P^T P] = I, so every kernel entry J(x) J(x')^T is estimated without bias, and applies the same
P to every sample (the index and its queries). It works entry by entry on the representation of
`netsim.layerwise` (`LinearFactors` / `DenseFactors`) and returns that same representation, so
the kernels run on a sketch unchanged:

- Linear layers, factored (grad_W^a = delta^a x^T): a Kronecker-structured projection
  P = P_out (x) P_in, applied to the two factors separately (as LoGra does):
  x -> P_in x `(k_in,)`, delta^a -> P_out delta^a `(k_out,)`, with Gaussian P_in, P_out scaled by
  1 / sqrt(k). The per-sample gradient `(out, in)` is never formed, and the sketched gram stays
  factored: (P_out delta . P_out delta')(P_in x . P_in x' + 1).
- Dense entries (convolutions, norms, embeddings, attention, the full Jacobian of the Jacobian
  engine): a count sketch -- each parameter goes to one of k buckets with a random sign. These
  per-sample gradients are already formed by their layer rule; the count sketch adds O(p_layer).

Budget: `k` is the number of stored values per sample and output row, shared between the entries
in proportion to their gradient energy (the mean squared gradient norm measured on a probe
chunk: a layer's estimation error grows with its share of |J|^2, so that allocation minimises the
summed variance). Entries whose exact representation fits their share are stored exactly (e.g.
factored Linear layers, whose in + d out values are few). The plan (sizes per entry and the seed)
is a JSON-able dict, stored with an index; the projections are regenerated from it.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .layerwise import DenseFactors, LinearFactors


def entry_energy(factors: list) -> list[float]:
    """Mean over the chunk's samples of each entry's squared Jacobian norm, sum_a |J^a|^2."""
    out = []
    for f in factors:
        if isinstance(f, DenseFactors):
            out.append(float((f.grads.double() ** 2).sum((1, 2)).mean()))
        else:
            inputs = ((f.x.double() ** 2).sum(1) if f.weight else 0.0) + (1.0 if f.bias else 0.0)
            out.append(float(((f.delta.double() ** 2).sum((1, 2)) * inputs).mean()))
    return out


def _demand(f, d: int) -> int:
    """Values stored per sample by the exact entry."""
    if isinstance(f, DenseFactors):
        return d * f.grads.shape[2]
    return (f.x.shape[1] if f.weight else 0) + d * f.delta.shape[2]


def plan_sketch(factors: list, k: int, seed: int) -> dict:
    """The sketch plan for representations laid out like `factors` (one probe chunk).

    Args:
        factors: a chunk's layer-wise entries (exact), whose energies set the budget shares.
        k: stored values per sample and output row (a positive int).
        seed: the seed every projection is drawn from.

    Returns:
        `{"k", "seed", "entries": [...]}`, one entry per factor: `{"kind": "exact"}`,
        `{"kind": "count", "p", "k"}` or `{"kind": "kronecker", "in", "out", "k_in", "k_out"}`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sketch must be a positive int (stored values per sample and output), got {k!r}")
    d = (factors[0].grads if isinstance(factors[0], DenseFactors) else factors[0].delta).shape[1]
    energy = [max(e, 0.0) for e in entry_energy(factors)]
    floor = 1e-12 * max(max(energy), 1e-300)
    weight = [max(e, floor) for e in energy]     # an entry silent on the probe still gets a share
    demand = [_demand(f, d) for f in factors]
    budget, open_ = float(k * d), set(range(len(factors)))
    exact: set[int] = set()
    while open_:   # water-filling: entries that fit their share are exact, the rest split what is left
        total = sum(weight[i] for i in open_)
        fits = {i for i in open_ if demand[i] <= budget * weight[i] / total}
        if not fits:
            break
        exact |= fits
        open_ -= fits
        budget -= sum(demand[i] for i in fits)
    total = sum(weight[i] for i in open_)
    entries = []
    for i, f in enumerate(factors):
        share = budget * weight[i] / total if i in open_ else 0.0
        if i in exact:
            entries.append({"kind": "exact"})
        elif isinstance(f, DenseFactors):
            entries.append({"kind": "count", "p": f.grads.shape[2], "k": max(1, int(share // d))})
        else:
            n_in, n_out = f.x.shape[1], f.delta.shape[2]
            k_in = min(n_in, max(1, round(share * n_in / (n_in + d * n_out)))) if f.weight else n_in
            k_out = min(n_out, max(1, int((share - (k_in if f.weight else 0)) // d)))
            entries.append({"kind": "kronecker", "in": n_in, "out": n_out, "k_in": k_in, "k_out": k_out})
    return {"k": k, "seed": seed, "entries": entries}


def _generator(seed: int, entry: int, part: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{entry}/{part}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class Sketch:
    """The projections of a plan (`plan_sketch`), drawn once (on the CPU, from the seed) and cached."""

    def __init__(self, plan: dict):
        self.plan = plan
        self._cache: dict = {}

    def _gaussian(self, i: int, part: str, rows: int, cols: int, like: Tensor) -> Tensor:
        key = (i, part, like.dtype, like.device)
        if key not in self._cache:
            m = torch.randn(rows, cols, generator=_generator(self.plan["seed"], i, part), dtype=torch.float64)
            self._cache[key] = (m / rows ** 0.5).to(like)
        return self._cache[key]

    def _buckets(self, i: int, p: int, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
        key = (i, "count", like.dtype, like.device)
        if key not in self._cache:
            g = _generator(self.plan["seed"], i, "count")
            bucket = torch.randint(0, k, (p,), generator=g)
            sign = torch.randint(0, 2, (p,), generator=g).to(torch.float64) * 2 - 1
            self._cache[key] = (bucket.to(like.device), sign.to(like))
        return self._cache[key]

    def apply(self, factors: list) -> list:
        """The sketched representation of a chunk (same entries, projected where the plan says)."""
        if len(factors) != len(self.plan["entries"]):
            raise ValueError(f"the sketch plan has {len(self.plan['entries'])} entries, the representation "
                             f"{len(factors)}: not the model the plan was made for")
        out = []
        for i, (f, spec) in enumerate(zip(factors, self.plan["entries"])):
            if spec["kind"] == "exact":
                out.append(f)
            elif spec["kind"] == "count":
                bucket, sign = self._buckets(i, spec["p"], spec["k"], f.grads)
                n, d, _ = f.grads.shape
                sketched = f.grads.new_zeros(n, d, spec["k"]).index_add_(2, bucket, f.grads * sign)
                out.append(DenseFactors(sketched, f.names))
            else:
                x = f.x
                if f.weight and spec["k_in"] < spec["in"]:
                    x = x @ self._gaussian(i, "in", spec["k_in"], spec["in"], x).T
                delta = f.delta
                if spec["k_out"] < spec["out"]:
                    delta = delta @ self._gaussian(i, "out", spec["k_out"], spec["out"], delta).T
                out.append(LinearFactors(x, delta, f.bias, f.weight, f.names))
        return out
