"""Registration errors and their cumulative accuracy curves (the paper's Figure 2).

Errors are measured against the true alignment, which only synthetic data has: distances
between predicted and true polygon vertices, or per-pixel norms of the difference between a
predicted and the true displacement field (optionally on building pixels only). Figure 2
plots F(τ), the "fraction of image pixels whose registration error is less than τ", and the
text quotes medians (18 px before, 3.5 px after self-denoising).

Example:
    >>> import torch
    >>> from netsim_paper.registration.metrics import accuracy_curve, curve_auc, median_error
    >>> errors = torch.tensor([0.0, 0.5, 1.0, 3.0])
    >>> taus, fraction = accuracy_curve(errors, tau_max=1.0, step=0.5)
    >>> taus.tolist(), fraction.tolist()
    ([0.0, 0.5, 1.0], [0.25, 0.5, 0.75])
    >>> median_error(errors), curve_auc(taus, fraction)
    (0.75, 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accuracy_curve", "curve_auc", "median_error", "pixel_errors", "vertex_errors"]


def _check_errors(errors: Tensor) -> Tensor:
    """Validates a set of errors (distances) and returns it flattened to ``(n,)``."""
    if not isinstance(errors, Tensor):
        errors = torch.as_tensor(errors)
    if not errors.is_floating_point():
        errors = errors.to(torch.float64)
    flat = errors.flatten()
    if flat.numel() == 0:
        raise ValueError("errors is empty: no vertex or pixel to measure (empty cadaster or mask?)")
    if torch.isnan(flat).any():
        raise ValueError(f"errors contain {int(torch.isnan(flat).sum())} NaN value(s) out of {flat.numel()}")
    if (flat < 0).any():
        raise ValueError(f"errors are distances and must be >= 0, got minimum {float(flat.min())}")
    return flat


def vertex_errors(predicted: Sequence[Tensor], truth: Sequence[Tensor]) -> Tensor:
    """Euclidean distance between corresponding vertices of two cadasters.

    Args:
        predicted: list of ``(n_i, 2)`` polygons (e.g. aligned by a network), pixel coordinates.
        truth: list of ``(n_i, 2)`` polygons, same number of polygons and vertices.

    Returns:
        ``(sum_i n_i,)`` distances in pixels, polygon after polygon.

    Raises:
        ValueError: if the two cadasters differ in structure.
    """
    predicted, truth = list(predicted), list(truth)
    if len(predicted) != len(truth):
        raise ValueError(f"cadasters differ in size: {len(predicted)} predicted vs {len(truth)} true polygons")
    if not predicted:
        raise ValueError("cadasters are empty: no vertex to measure")
    distances = []
    for index, (guess, target) in enumerate(zip(predicted, truth, strict=True)):
        if guess.ndim != 2 or guess.shape[1] != 2 or guess.shape != target.shape:
            raise ValueError(f"polygon {index}: predicted shape {tuple(guess.shape)} does not match "
                             f"true shape {tuple(target.shape)} (both must be (n, 2))")
        distances.append((guess - target).norm(dim=1))
    return torch.cat(distances)


def pixel_errors(predicted_field: Tensor, true_field: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-pixel registration error: the norm of the difference of two displacement fields.

    Args:
        predicted_field: ``(2, H, W)`` or ``(B, 2, H, W)``, pixels (dx, dy).
        true_field: same shape.
        mask: optional boolean ``(H, W)`` or ``(B, H, W)`` (or anything broadcastable to the
            fields' ``(..., H, W)``) selecting the pixels to measure, e.g. building interiors
            or edges. A float raster must be thresholded first (``raster > 0.5``).

    Returns:
        ``(n,)`` errors in pixels, n = number of selected pixels (all of them without a mask).
    """
    if predicted_field.shape != true_field.shape:
        raise ValueError(f"field shapes differ: {tuple(predicted_field.shape)} vs {tuple(true_field.shape)}")
    if predicted_field.ndim not in (3, 4) or predicted_field.shape[-3] != 2:
        raise ValueError(f"fields must have shape (2, H, W) or (B, 2, H, W), got {tuple(predicted_field.shape)}")
    norms = (predicted_field - true_field).norm(dim=-3)  # (H, W) or (B, H, W)
    if mask is None:
        return norms.flatten()
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got {mask.dtype}; threshold a raster first (raster > 0.5)")
    try:
        mask = mask.expand_as(norms)
    except RuntimeError as error:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit the fields' pixels "
                         f"{tuple(norms.shape)}") from error
    return norms[mask]


def _tau_grid(tau_max: float, step: float, dtype: torch.dtype) -> Tensor:
    """0, step, 2 step, ... up to tau_max, with tau_max itself appended if it is off the grid."""
    count = math.floor(tau_max / step + 1e-9)
    taus = torch.arange(count + 1, dtype=dtype) * step
    if tau_max - float(taus[-1]) > 1e-9 * max(1.0, tau_max):
        taus = torch.cat([taus, torch.tensor([tau_max], dtype=dtype)])
    return taus


def accuracy_curve(errors: Tensor, tau_max: float | None = None, step: float = 0.25) -> tuple[Tensor, Tensor]:
    """The cumulative accuracy curve F(τ) = fraction of errors <= τ.

    Args:
        errors: errors in pixels, any shape (flattened), >= 0, no NaN.
        tau_max: last threshold; default: the largest error rounded up to a multiple of
            ``step`` (so the curve reaches 1). Fix it to compare several curves.
        step: threshold spacing in pixels (the grid is 0, step, ..., and tau_max if off-grid).

    Returns:
        ``(taus, fraction)``, both ``(T,)`` (float64); ``fraction`` is non-decreasing in [0, 1].
    """
    flat = _check_errors(errors).to(torch.float64)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be finite and > 0, got {step!r}")
    if tau_max is None:
        largest = float(flat.max())
        if not math.isfinite(largest):
            raise ValueError("errors contain inf: give tau_max explicitly")
        tau_max = math.ceil(largest / step - 1e-9) * step
    if not (math.isfinite(tau_max) and tau_max >= 0):
        raise ValueError(f"tau_max must be finite and >= 0, got {tau_max!r}")
    taus = _tau_grid(tau_max, step, torch.float64)
    # Counting by binary search on the sorted errors: O((n + T) log n) even for all pixels of a tile set.
    at_most = torch.searchsorted(flat.sort().values, taus, right=True)
    return taus, at_most.to(torch.float64) / flat.numel()


def median_error(errors: Tensor) -> float:
    """The median of the errors (mean of the two middle values for an even count).

    Args:
        errors: errors in pixels, any shape (flattened), >= 0, no NaN.

    Returns:
        The median, in pixels.
    """
    ordered = _check_errors(errors).to(torch.float64).sort().values
    middle = ordered.numel() // 2
    if ordered.numel() % 2:
        return float(ordered[middle])
    # torch.median would return the lower middle value; the usual median averages the two.
    return float((ordered[middle - 1] + ordered[middle]) / 2)


def curve_auc(taus: Tensor, fraction: Tensor) -> float:
    """Normalised area under an accuracy curve on [taus[0], taus[-1]].

    The trapezoidal area under F divided by the interval length ``taus[-1] - taus[0]``, so 1
    means every error is 0 (F = 1 from τ = 0) and 0 means none is below ``taus[-1]``. For the
    exact empirical F and a fine grid starting at 0 it tends to ``mean(1 - min(e, τ_max) / τ_max)``;
    the trapezoids blur each error's step by at most one grid spacing.

    Args:
        taus: ``(T,)`` increasing thresholds, T >= 2 (as returned by `accuracy_curve`).
        fraction: ``(T,)`` values of F at ``taus``, in [0, 1].

    Returns:
        The normalised area, in [0, 1].
    """
    if taus.ndim != 1 or fraction.shape != taus.shape:
        raise ValueError(f"taus and fraction must be matching 1-D tensors, got {tuple(taus.shape)} "
                         f"and {tuple(fraction.shape)}")
    if taus.numel() < 2:
        raise ValueError("need at least two thresholds to measure an area (tau_max = 0 gives one)")
    if torch.isnan(taus).any() or torch.isnan(fraction).any():
        raise ValueError("taus and fraction must not contain NaN")
    if not bool((taus[1:] > taus[:-1]).all()):
        raise ValueError("taus must be strictly increasing")
    if bool((fraction < 0).any() or (fraction > 1).any()):
        raise ValueError("fraction must lie in [0, 1]")
    taus, fraction = taus.to(torch.float64), fraction.to(torch.float64)
    area = torch.trapezoid(fraction, taus)
    return float(area / (taus[-1] - taus[0]))
