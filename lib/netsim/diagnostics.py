"""Diagnostics of a trained network read from its kernels (paper section 4.4, talk part IV).

- `uncertainty_factor`: how far f(x) could have moved during training without disturbing the
  other points: ||grad f(x)||^2 / sum_x' k^I(x, x') (the paper's quick approximation).
- `fit_diagnostic`: the neighbour count together with the spread of the targets within the
  neighbourhood, which separates over-fit (isolated points, labels learnt by heart) from
  under-fit (many neighbours with varied targets) and from mere high density.
- `kernel_average`: E_k[a](x) = (sum_x' K(x, x'))^-1 sum_x' K(x, x') a(x') with the
  un-normalised d x d kernels, the averaging operator of the self-denoising analysis.

The uncertainty factor and the kernel average are linear in sums of Jacobians, so like the
soft density they are computed in two passes without holding the gradient matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .density import soft_count
from .engine import engine_for
from .grads import OutputFn, output_dim, trainable_parameters


def uncertainty_factor(model: nn.Module, xs: Tensor, *, reference: Tensor | None = None,
                       output_fn: OutputFn | None = None, targets: Tensor | None = None,
                       reference_targets: Tensor | None = None, chunk_size: int | None = None,
                       method: str = "auto") -> Tensor:
    """||grad f(x)||^2 / sum_x' k^I(x, x') for every x in `xs`. `(N, ...) -> (N,)`.

    For d > 1 both sides are traces: Tr K(x, x) / Tr sum_x' K(x, x'). A large value means that
    f(x) could have been set to many values without disturbing the training of the other
    points: an uncertain prediction. The reference set (default `xs`, self term included) is
    the training set whose disturbance is measured. Two passes: S = sum_x' J(x'), then
    Tr J(x) S^T.

    Raises:
        ValueError: where sum_x' k^I(x, x') <= 0 (the quick approximation of the paper is then
            meaningless: the total disturbance is sum |k^I|, not sum k^I).
    """
    if reference is None:
        reference, reference_targets = xs, targets
    engine = engine_for(model, xs, output_fn, targets, chunk_size, method)
    S = None
    for _, rep in engine.chunks(reference, reference_targets):
        S = engine.add_sums(S, engine.summed(rep))
    factors = []
    for start, rep in engine.chunks(xs, targets):
        own = engine.self_gram(rep).diagonal(dim1=-2, dim2=-1).sum(-1)
        total = engine.dot_with_sums(rep, S).diagonal(dim1=-2, dim2=-1).sum(-1)
        bad = torch.nonzero(total <= 0).flatten()
        if len(bad):
            raise ValueError(f"sum_x' k^I(x, x') <= 0 for samples {(bad + start).tolist()[:20]}: the "
                             "quick uncertainty approximation is undefined there")
        factors.append(own / total)
    return torch.cat(factors)


def kernel_average(model: nn.Module, xs: Tensor, values: Tensor, *, queries: Tensor | None = None,
                   output_fn: OutputFn | None = None, targets: Tensor | None = None,
                   query_targets: Tensor | None = None, chunk_size: int | None = None,
                   method: str = "auto") -> Tensor:
    """E_k[a](x) = (sum_j K(x, x_j))^-1 sum_j K(x, x_j) a_j, un-normalised d x d kernels.

    Two passes: S = sum_j J_j and B = sum_j a_j^T J_j, then sum_j K(x, x_j) = J(x) S^T and
    sum_j K(x, x_j) a_j = J(x) B^T. Time O((N + Q) d p), memory O(chunk d p) -- less with the
    layer-wise engine.

    Args:
        model: trained network.
        xs: `(N, ...)` samples x_j carrying the values.
        values: `(N, d)` (or `(N,)` for d = 1) values a_j, e.g. labels or predictions.
        queries: `(Q, ...)` points where the average is taken (default xs).

    Returns:
        `(Q, d)` kernel averages.
    """
    values = values.unsqueeze(1) if values.ndim == 1 else values
    if values.shape[0] != xs.shape[0]:
        raise ValueError(f"values has {values.shape[0]} rows for {xs.shape[0]} samples")
    d = output_dim(model, xs, output_fn, targets)
    if values.shape[1] != d:
        raise ValueError(f"values must have d = {d} columns (the output dimension), got {values.shape[1]}")
    if queries is None:
        queries, query_targets = xs, targets
    engine = engine_for(model, xs, output_fn, targets, chunk_size, method)
    dtype = next(iter(trainable_parameters(model).values())).dtype
    S = B = None
    for start, rep in engine.chunks(xs, targets):
        a = values[start:start + engine.size(rep)].to(dtype)
        S = engine.add_sums(S, engine.summed(rep))
        B = engine.add_sums(B, engine.summed(engine.transform(rep, a.unsqueeze(1))))   # rows a_j^T J_j
    out = []
    for _, rep in engine.chunks(queries, query_targets):
        total_k = engine.dot_with_sums(rep, S)              # (n, d, d) sum_j K(x, x_j)
        weighted = engine.dot_with_sums(rep, B)[..., 0]     # (n, d)    sum_j K(x, x_j) a_j
        out.append(torch.linalg.solve(total_k.double(), weighted.double()).to(total_k.dtype))
    return torch.cat(out)


@dataclass
class FitDiagnostic:
    """Per-sample fit diagnostic (all `(N,)`).

    Attributes:
        count: soft neighbour count N_S (self included).
        local_std: spread of the targets among the neighbours (positive-k^C weighted std).
        relative_std: local_std / global target std.
        overfit: isolated points (count < `isolated_below`): any label could be learnt by heart.
        underfit: crowded neighbourhoods with varied targets (count > `crowded_above` and
            relative_std > `varied_above`): the network cannot tell apart points whose labels differ.
    """

    count: Tensor
    local_std: Tensor
    relative_std: Tensor
    overfit: Tensor
    underfit: Tensor


def fit_diagnostic(kc: Tensor, targets: Tensor, *, isolated_below: float = 2.0,
                   crowded_above: float | None = None, varied_above: float = 0.5) -> FitDiagnostic:
    """Combines neighbour counts with the target variance in each neighbourhood (section 4.4).

    Args:
        kc: `(N, N)` k^C among the training samples.
        targets: `(N,)` or `(N, k)` training targets.
        isolated_below: soft counts below this flag a likely over-fit (default 2: hardly more than
            the point itself).
        crowded_above: soft counts above this may under-fit (default: 10% of the data set).
        varied_above: ... when the neighbours' target std exceeds this fraction of the global std.
    """
    if kc.ndim != 2 or kc.shape[0] != kc.shape[1] or kc.shape[0] != targets.shape[0]:
        raise ValueError("kc must be (N, N) and targets (N, ...) for the same N samples")
    y = targets.reshape(targets.shape[0], -1).to(kc.dtype)
    w = kc.clamp_min(0)
    w_sum = w.sum(1, keepdim=True)              # >= 1: the self term k^C(x, x) = 1
    mean = w @ y / w_sum
    local_var = (w @ (y * y) / w_sum - mean * mean).clamp_min(0).sum(1)
    global_std = y.std(0, unbiased=False).pow(2).sum().sqrt()
    if global_std == 0:
        raise ValueError("all targets are equal: the relative spread of targets is undefined")
    count = soft_count(kc)
    local_std = local_var.sqrt()
    relative = local_std / global_std
    crowded = 0.1 * kc.shape[0] if crowded_above is None else crowded_above
    return FitDiagnostic(count=count, local_std=local_std, relative_std=relative,
                         overfit=count < isolated_below,
                         underfit=(count > crowded) & (relative > varied_above))
