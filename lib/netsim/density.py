"""Neighbour counts from the similarity k^C (paper section 4): hard, soft, positive-only.

Conventions (also in every figure that shows them):

- hard        N_tau(x)     = #{x' != x : k^C(x, x') >= tau}            self excluded
- soft        N_S(x)       = sum_x' k^C(x, x')                         self included (k^C(x, x) = 1)
- positive    N_alpha^+(x) = sum_{x' != x, k^C > 0} k^C(x, x')^alpha   self excluded

so that int_0^1 N_tau dtau = N_1^+ and, when no k^C is negative, N_S = N_1^+ + 1.

The dense estimators take one `(N, M)` similarity matrix (small N: compute it once and read
every estimator from it). `soft_density` needs no matrix at all: the soft count is a dot
product with the sum of the normalised Jacobians (section 4.2), computed in two passes over
the data, O(N d^2 p) time and O(chunk d p) memory.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .grads import OutputFn, iter_jacobians
from .kernel import _prepare, similarity

ESTIMATORS = ("hard", "soft", "positive")


def _check_tau(tau: float) -> None:
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1] (a threshold on k^C), got {tau}")


def _check_alpha(alpha: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")


def _off_self(kc: Tensor, self_index: Tensor | None) -> Tensor:
    """Boolean `(N, M)` mask that is False at each row's own sample."""
    mask = torch.ones_like(kc, dtype=torch.bool)
    if self_index is not None:
        mask[torch.arange(kc.shape[0], device=kc.device), self_index] = False
    return mask


def _self_index(kc: Tensor, self_index: Tensor | None) -> Tensor | None:
    if self_index is None and kc.shape[0] == kc.shape[1]:
        return torch.arange(kc.shape[0], device=kc.device)
    return self_index


def hard_count(kc: Tensor, tau: float, self_index: Tensor | None = None) -> Tensor:
    """N_tau: neighbours with k^C >= tau, self excluded.

    Args:
        kc: `(N, M)` k^C of each query to each reference sample.
        tau: threshold in [0, 1].
        self_index: `(N,)` column of each query's own sample; default: the diagonal when
            N = M (the queries are the references), none otherwise.

    Returns:
        `(N,)` counts (float).
    """
    _check_tau(tau)
    mask = _off_self(kc, _self_index(kc, self_index))
    return ((kc >= tau) & mask).sum(1).to(kc.dtype)


def positive_count(kc: Tensor, alpha: float, self_index: Tensor | None = None) -> Tensor:
    """N_alpha^+: sum of k^C^alpha over positive similarities, self excluded. `(N, M) -> (N,)`."""
    _check_alpha(alpha)
    mask = _off_self(kc, _self_index(kc, self_index)) & (kc > 0)
    return torch.where(mask, kc.clamp_min(0) ** alpha, torch.zeros_like(kc)).sum(1)


def soft_count(kc: Tensor) -> Tensor:
    """N_S: the plain row sum of k^C, self included. `(N, M) -> (N,)`."""
    return kc.sum(1)


def counts_from_kernel(kc: Tensor, estimator: str, *, tau: float = 0.9, alpha: float = 2.0,
                       self_index: Tensor | None = None) -> Tensor:
    """Any estimator from a precomputed `(N, M)` k^C matrix (see the module conventions)."""
    if estimator == "hard":
        return hard_count(kc, tau, self_index)
    if estimator == "positive":
        return positive_count(kc, alpha, self_index)
    if estimator == "soft":
        return soft_count(kc)
    raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


def neighbour_counts(model: nn.Module, xs: Tensor, *, estimator: str = "hard", tau: float = 0.9,
                     alpha: float = 2.0, output_fn: OutputFn | None = None,
                     targets: Tensor | None = None, **similarity_kwargs) -> Tensor:
    """Neighbour counts of every x in `xs` among `xs` itself. `(N, ...) -> (N,)`.

    The soft estimate goes through `soft_density` (no N x N matrix); hard and positive-only
    counts need the `(N, N)` k^C matrix (streamed by `similarity`, O(N^2) memory).
    """
    if estimator == "soft":
        return soft_density(model, xs, output_fn=output_fn, targets=targets)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _check_tau(tau) if estimator == "hard" else _check_alpha(alpha)
    kc = similarity(model, xs, kind="correlation", output_fn=output_fn, x_targets=targets,
                    **similarity_kwargs)
    return counts_from_kernel(kc, estimator, tau=tau, alpha=alpha)


def _normalised(J: Tensor, rtol: float | None, on_zero: str, offset: int) -> tuple[Tensor, Tensor]:
    """Q / sqrt(rank) with Q = K(x,x)^-1/2 J, so that k^C(x, x') = <Q_x, Q_x'>_F / sqrt(r r')
    becomes a plain Frobenius product of these scaled factors."""
    Q, rank = _prepare(J, "correlation", rtol, on_zero, offset)
    scale = torch.where(rank > 0, rank.to(J.dtype).clamp_min(1).rsqrt(), torch.zeros_like(rank, dtype=J.dtype))
    return Q * scale[:, None, None], rank


def soft_density(model: nn.Module, xs: Tensor, *, reference: Tensor | None = None,
                 output_fn: OutputFn | None = None, targets: Tensor | None = None,
                 reference_targets: Tensor | None = None, chunk_size: int | None = None,
                 rtol: float | None = None, on_zero: str = "raise") -> Tensor:
    """The soft neighbour count N_S(x) = sum_x' k^C(x, x') without any N x N matrix.

    Two passes (paper section 4.2): first A = sum_x' Q(x') over the reference set, with
    Q(x') = K(x',x')^-1/2 J(x') / sqrt(rank) (for d = 1 simply g(x') / ||g(x')||); then
    N_S(x) = <Q(x), A>_F for every query. Time O((N + M) d^2 p), memory O(chunk d p + d p):
    the gradient matrix is never held.

    Args:
        model: the trained network.
        xs: `(N, ...)` queries.
        reference: `(M, ...)` samples counted as potential neighbours; None means xs (then the
            count includes the self term k^C(x, x) = 1).
        output_fn, targets, reference_targets: see `per_sample_grads`.
        chunk_size: samples per Jacobian evaluation.
        rtol, on_zero: see `netsim.similarity`.

    Returns:
        `(N,)` soft counts.
    """
    if reference is None:
        reference, reference_targets = xs, targets
    total = None
    for start, J in iter_jacobians(model, reference, output_fn, chunk_size, reference_targets):
        Q, _ = _normalised(J, rtol, on_zero, start)
        part = Q.sum(0)
        total = part if total is None else total + part
    counts = []
    for start, J in iter_jacobians(model, xs, output_fn, chunk_size, targets):
        Q, _ = _normalised(J, rtol, on_zero, start)
        counts.append(torch.einsum("nap,ap->n", Q, total))
    return torch.cat(counts)


def estimator_name(estimator: str, *, tau: float | None = None, alpha: float | None = None) -> str:
    """Display name used in tables and figures, e.g. "N_S", "N_tau=0.9", "N_alpha=2^+"."""
    if estimator == "soft":
        return "N_S"
    if estimator == "hard":
        return f"N_tau={tau:g}"
    return f"N_alpha={alpha:g}^+"


def all_counts(kc: Tensor, taus=(), alphas=()) -> dict[str, Tensor]:
    """Every estimator read from one `(N, M)` k^C matrix, computed once.

    Returns:
        {name: (N,) counts} for the soft count, each hard threshold in `taus` and each exponent
        in `alphas` (names from `estimator_name`).
    """
    out = {estimator_name("soft"): soft_count(kc)}
    out.update({estimator_name("hard", tau=t): hard_count(kc, t) for t in taus})
    out.update({estimator_name("positive", alpha=a): positive_count(kc, a) for a in alphas})
    return out
