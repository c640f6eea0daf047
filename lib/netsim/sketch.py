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
- Dense entries (convolutions, norms, the full Jacobian of the Jacobian engine): a count sketch --
  each parameter goes to one of k buckets with a random sign. These per-sample gradients are
  already formed by their layer rule; the count sketch adds O(p_layer).
- Maps shared by token positions (`layerwise.TokenFactors`: Linear over tokens, GPT-2's `Conv1D`,
  attention projections, embeddings), whose gradient sum_t delta_t x_t^T is never formed: a tensor
  sketch (Pham & Pagh 2013), the count sketch of the weight `(rows, cols)` with bucket
  h(r) + h'(c) mod k and sign s(r) s'(c). It is linear in each token's outer product, so each
  token's two factors are count-sketched apart and multiplied in the Fourier domain, summed over
  the tokens, and transformed back once: O(T (rows + G cols + G k log k)) per sample, never
  O(T rows cols). With one column hash for all rows, the collision errors of every row repeat the
  same column pattern and add up instead of averaging out (on a GPT-2 language model the k^C
  error was that of a plain count sketch of half the size); so the rows are split into
  `ROW_GROUPS` groups by a hash, each with its own column hash h'_g (a sum of G tensor sketches
  over disjoint rows), which brings the error to that of a plain count sketch of the same size
  (`bench/hf_index.py`). An embedding's row factor is the one-hot of its token id: the id is
  hashed. The hashes are keyed by parameter name, so the uses of a tied parameter (GPT-2's
  `lm_head` and token embedding, `layerwise.TokenSum`) are sketched alike and added.

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

from .layerwise import DenseFactors, LinearFactors, TokenFactors, TokenSum, entry_shape


def entry_energy(factors: list) -> list[float]:
    """Mean over the chunk's samples of each entry's squared Jacobian norm, sum_a |J^a|^2 (for a
    tied parameter's `TokenSum`, the sum of its parts': their cross terms are left out)."""
    return [float(_energy(f).mean()) for f in factors]


def _energy(f) -> Tensor:
    """`(n,)` sum_a |J^a|^2 of one entry, in float64."""
    if isinstance(f, DenseFactors):
        return (f.grads.double() ** 2).sum((1, 2))
    if isinstance(f, TokenSum):
        return sum(_energy(part) for part in f.parts)
    if isinstance(f, TokenFactors):   # |sum_t delta_t x_t^T|^2 = sum_ts (delta_t . delta_s)(x_t . x_s)
        delta = f.delta.double()
        grams = delta @ delta.transpose(2, 3)                                      # (n, d, T, T)
        if f.kind == "embedding":
            same = (f.x[:, :, None] == f.x[:, None, :]).double()
            total = (grams * same[:, None]).sum((1, 2, 3))
        else:
            x = f.x.double()
            total = (grams * (x @ x.transpose(1, 2))[:, None]).sum((1, 2, 3)) if f.weight else 0.0
            total = total + (grams.sum((2, 3)).sum(1) if f.bias else 0.0)
        return total
    inputs = ((f.x.double() ** 2).sum(1) if f.weight else 0.0) + (1.0 if f.bias else 0.0)
    return (f.delta.double() ** 2).sum((1, 2)) * inputs


def _token_weight_shape(f: TokenFactors) -> tuple[int, int]:
    """(rows, cols) of a token entry's weight as the parameter stores it."""
    inputs, outputs = (f.rows, f.delta.shape[3]) if f.kind == "embedding" else (f.x.shape[2], f.delta.shape[3])
    return (inputs, outputs) if f.kind in ("transposed", "embedding") else (outputs, inputs)


def _demand(f, d: int) -> int:
    """Values stored per sample by the exact entry."""
    if isinstance(f, DenseFactors):
        return d * f.grads.shape[2]
    if isinstance(f, TokenSum):
        return _demand(f.parts[0], d)
    if isinstance(f, TokenFactors):   # stored exact as its dense gradient
        rows, cols = _token_weight_shape(f)
        return d * ((rows * cols if f.weight else 0) + (f.delta.shape[3] if f.bias else 0))
    return (f.x.shape[1] if f.weight else 0) + d * f.delta.shape[2]


def plan_sketch(factors: list, k: int, seed: int) -> dict:
    """The sketch plan for representations laid out like `factors` (one probe chunk).

    Args:
        factors: a chunk's layer-wise entries (exact), whose energies set the budget shares.
        k: stored values per sample and output row (a positive int).
        seed: the seed every projection is drawn from.

    Returns:
        `{"k", "seed", "entries": [...]}`, one entry per factor: `{"kind": "exact"}`,
        `{"kind": "count", "p", "k"}`, `{"kind": "kronecker", "in", "out", "k_in", "k_out"}` or
        `{"kind": "tensor", "k"}` (token entries).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sketch must be a positive int (stored values per sample and output), got {k!r}")
    d = entry_shape(factors[0])[1]
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
        elif isinstance(f, (TokenFactors, TokenSum)):
            entries.append({"kind": "tensor", "k": max(1, int(share // d))})
        elif isinstance(f, DenseFactors):
            entries.append({"kind": "count", "p": f.grads.shape[2], "k": max(1, int(share // d))})
        else:
            n_in, n_out = f.x.shape[1], f.delta.shape[2]
            k_in = min(n_in, max(1, round(share * n_in / (n_in + d * n_out)))) if f.weight else n_in
            k_out = min(n_out, max(1, int((share - (k_in if f.weight else 0)) // d)))
            entries.append({"kind": "kronecker", "in": n_in, "out": n_out, "k_in": k_in, "k_out": k_out})
    return {"k": k, "seed": seed, "entries": entries}


#: Row groups of the tensor sketch, each with its own column hash (see the module). Measured on
#: a GPT-2 language model at k = 1024 (`bench/hf_index.py --quick`, 50 x 200 windows), median
#: |k^C error| 0.026 with 1 group, 0.022 with 4, 0.022 with 16 and 64; a plain count sketch of
#: the formed gradients 0.021.
ROW_GROUPS = 8


def _generator(seed: int, entry: int | str, part: str) -> torch.Generator:
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

    def _hash(self, name: str, part: str, size: int, k: int, like: Tensor, groups: int = 1) -> tuple[Tensor, Tensor]:
        """(bucket, sign) `(groups, size)` of one side of a parameter, keyed by its name (tied uses
        agree), buckets in [0, k); `groups` independent hashes."""
        key = (name, part, size, k, groups, like.dtype, like.device)
        if key not in self._cache:
            g = _generator(self.plan["seed"], name, part)
            bucket = torch.randint(0, k, (groups, size), generator=g)
            sign = torch.randint(0, 2, (groups, size), generator=g).to(torch.float64) * 2 - 1
            self._cache[key] = (bucket.to(like.device), sign.to(like))
        return self._cache[key]

    def _count(self, values: Tensor, name: str, part: str, k: int) -> Tensor:
        """The count sketch `(..., k)` of the last dimension of `values`."""
        (bucket,), (sign,) = self._hash(name, part, values.shape[-1], k, values)
        return values.new_zeros(*values.shape[:-1], k).index_add_(values.ndim - 1, bucket, values * sign)

    def row_buckets(self, name: str, rows: int, k: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """`(rows,)` each row's bucket among the `ROW_GROUPS` x k of a token entry (group g(r) times k,
        plus h(r)) and its sign."""
        (bucket,), (sign,) = self._hash(name, "rows", rows, k, like)
        (group,), _ = self._hash(name, "groups", rows, ROW_GROUPS, like)
        return group * k + bucket, sign

    def _tensor(self, f: TokenFactors, k: int) -> Tensor:
        """The tensor sketch `(n, d, k)` of a token entry's per-sample gradient (see the module)."""
        n, d, t, _ = f.delta.shape
        out = f.delta.new_zeros(n, d, k)
        if f.weight and f.kind == "embedding":
            out += self._embedding(f, k)
        elif f.weight:
            name = f.names[0]
            inputs, outputs = f.x[:, None], f.delta               # (n, 1, T, in), (n, d, T, out)
            row_side, col_side = (inputs, outputs) if f.kind == "transposed" else (outputs, inputs)
            bucket, sign = self.row_buckets(name, row_side.shape[-1], k, row_side)
            rows = row_side.new_zeros(*row_side.shape[:-1], ROW_GROUPS * k).index_add_(3, bucket, row_side * sign)
            # each group's own column hash: buckets g k + h'_g(c) of the columns repeated per group
            bucket, sign = self._hash(name, "cols", col_side.shape[-1], k, col_side, ROW_GROUPS)
            offsets = (torch.arange(ROW_GROUPS, device=bucket.device)[:, None] * k + bucket).flatten()
            repeated = (col_side.unsqueeze(-2) * sign).flatten(-2)                  # (..., G cols)
            cols = col_side.new_zeros(*col_side.shape[:-1], ROW_GROUPS * k).index_add_(3, offsets, repeated)
            spectra = [torch.fft.rfft(side.unflatten(3, (ROW_GROUPS, k)), dim=4) for side in (rows, cols)]
            out += torch.fft.irfft((spectra[0] * spectra[1]).sum((2, 3)), n=k, dim=2)   # over tokens and groups
        if f.bias:
            out += self._count(f.delta.sum(2), f.names[-1], "rows", k)
        return out

    def _embedding(self, f: TokenFactors, k: int) -> Tensor:
        """An embedding's tensor sketch `(n, d, k)`: each token's row is one-hot, so its convolution is
        a signed shift -- every Delta_t[c] goes straight to bucket h(id) + h'_g(id)(c) with sign
        s(id) s'_g(id)(c) (one scatter, no Fourier transform)."""
        n, d, t, dim = f.delta.shape
        bucket, sign = self.row_buckets(f.names[0], f.rows, k, f.delta)
        group, shift = bucket[f.x] // k, bucket[f.x] % k                            # (n, T)
        col_bucket, col_sign = self._hash(f.names[0], "cols", dim, k, f.delta, ROW_GROUPS)
        target = (col_bucket[group] + shift[..., None]) % k                           # (n, T, dim)
        values = f.delta * (col_sign[group] * sign[f.x][..., None])[:, None]          # (n, d, T, dim)
        return f.delta.new_zeros(n, d, k).scatter_add_(2, target.reshape(n, 1, -1).expand(n, d, -1),
                                                         values.reshape(n, d, -1))

    def apply(self, factors: list) -> list:
        """The sketched representation of a chunk (same entries, projected where the plan says;
        token entries become dense `(n, d, k)` sketches, or their dense gradients where exact)."""
        if len(factors) != len(self.plan["entries"]):
            raise ValueError(f"the sketch plan has {len(self.plan['entries'])} entries, the representation "
                             f"{len(factors)}: not the model the plan was made for")
        out = []
        for i, (f, spec) in enumerate(zip(factors, self.plan["entries"])):
            if spec["kind"] == "exact":
                out.append(f.dense() if isinstance(f, (TokenFactors, TokenSum)) else f)
            elif spec["kind"] == "tensor":
                parts = f.parts if isinstance(f, TokenSum) else [f]
                out.append(DenseFactors(sum(self._tensor(part, spec["k"]) for part in parts), f.names))
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
