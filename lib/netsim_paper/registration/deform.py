"""Smooth random displacement fields, warping, and the sign conventions of registration.

The registration experiment of the paper's section 1 (after Girard et al., "Noisy supervision
for correcting misaligned cadaster maps") trains on pairs ((I, M∘φ), φ): an aerial image I,
the raster M of its building cadaster misaligned by a random smooth field φ, and φ itself.
Every module of `netsim_paper.registration` follows these conventions:

- Coordinates: ``(x, y)`` in pixels of the full-resolution tile, x = column, y = row, pixel
  centres at integer + 0.5, so an ``(H, W)`` tile spans ``[0, W] x [0, H]``.
- Polygon: an ``(n, 2)`` float64 tensor of vertices ``(x, y)``; a cadaster is a list of them.
- Displacement field φ: a ``(2, H, W)`` float tensor in pixels (``(B, 2, H, W)`` where
  batches are natural), channel 0 = dx, channel 1 = dy, given at pixel centres; between
  centres it is read bilinearly, beyond the outermost centres it is clamped (border value).
- Warping an image by φ samples it at ``p + φ(p)``: ``warp_image(I, φ)(p) = I(p + φ(p))``.
  The misaligned raster M∘φ of the training pairs is ``warp_image(M, φ)``.
- Moving polygons by φ: ``v' = v - φ(v)``. A point p lies inside the warped raster iff
  ``p + φ(p)`` lies inside the original polygon, so the warped outline is the image of the
  original one under ``(id + φ)^-1 ≈ id - φ``: the raster of the moved polygons and the warped
  raster agree to first order. ``move_polygons(..., iterations=k)`` solves ``v' + φ(v') = v``
  by fixed-point iteration and makes them agree exactly at the vertices.
- Aligning: a network predicts φ from (I, misaligned raster); ``v = v' + φ(v')`` puts the
  misaligned vertices v' back (``align_polygons``), the inverse of ``move_polygons`` to first
  order (exactly, for the converged move).
- Rotations (``rotate90``) follow ``torch.rot90(t, k, dims=(-2, -1))``: counter-clockwise as
  displayed (rows downwards). For k = 1 a point moves as ``(x, y) -> (y, W - x)`` and a vector
  as ``(dx, dy) -> (dy, -dx)``, so the constant field (1, 0) becomes (0, -1).

Example:
    >>> import torch
    >>> from netsim_paper.registration.deform import random_field, move_polygons, align_polygons
    >>> phi = random_field(64, 64, amplitude=2.0, generator=torch.Generator().manual_seed(0))
    >>> phi.shape, round(float(phi[0].abs().max()), 6)
    (torch.Size([2, 64, 64]), 2.0)
    >>> square = torch.tensor([[20.0, 20.0], [40.0, 20.0], [40.0, 40.0], [20.0, 40.0]], dtype=torch.float64)
    >>> moved = move_polygons([square], phi, iterations=20)
    >>> bool(torch.allclose(align_polygons(moved, phi)[0], square, atol=1e-4))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "align_polygons",
    "compose",
    "control_grid_field",
    "field_at",
    "flip",
    "flip_polygons",
    "inverse_approx",
    "move_polygons",
    "pixel_centres",
    "random_field",
    "rotate90",
    "rotate90_polygons",
    "scale_field",
    "warp_image",
]

Polygons = Tensor | Sequence[Tensor]
"""One polygon ``(n, 2)`` or a cadaster (a list of them); functions return the same kind."""

FLIP_AXES = ("x", "y")


# --------------------------------------------------------------------------- validation


def _check_tile_size(height: int, width: int) -> None:
    if not (isinstance(height, int) and isinstance(width, int)) or height < 1 or width < 1:
        raise ValueError(f"tile size must be positive integers, got height={height!r}, width={width!r}")


def _check_amplitude(amplitude: float) -> None:
    if not math.isfinite(amplitude) or amplitude < 0:
        raise ValueError(f"amplitude (pixels) must be finite and >= 0, got {amplitude!r}")


def _check_generator(generator: torch.Generator) -> None:
    # A required generator keeps every field reproducible; the global RNG would silently not be.
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def _check_field(field: Tensor, name: str = "field") -> None:
    if not isinstance(field, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(field).__name__}")
    if field.ndim not in (3, 4) or field.shape[-3] != 2:
        raise ValueError(f"{name} must have shape (2, H, W) or (B, 2, H, W) (dx, dy), got {tuple(field.shape)}")
    if not field.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {field.dtype}")


def _check_image(image: Tensor, name: str = "image") -> None:
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(image).__name__}")
    if image.ndim not in (3, 4):
        raise ValueError(f"{name} must have shape (C, H, W) or (B, C, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        # grid_sample interpolates; an integer (e.g. uint8) image would need a rounding policy.
        raise TypeError(f"{name} must be a floating-point tensor, got {image.dtype}; convert it first")


def _check_same_spatial_size(**tensors: Tensor | None) -> None:
    sizes = {name: tuple(t.shape[-2:]) for name, t in tensors.items() if t is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"spatial sizes (H, W) differ: {sizes}")


# --------------------------------------------------------------------------- coordinates


def pixel_centres(height: int, width: int, *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Tensor:
    """The identity map: the ``(x, y)`` coordinates of every pixel centre.

    Args:
        height: H, rows of the tile.
        width: W, columns of the tile.
        dtype: floating dtype of the result.
        device: device of the result.

    Returns:
        ``(2, H, W)``: channel 0 = ``j + 0.5`` (x of column j), channel 1 = ``i + 0.5`` (y of row i).
    """
    _check_tile_size(height, width)
    x = torch.arange(width, dtype=dtype, device=device) + 0.5
    y = torch.arange(height, dtype=dtype, device=device) + 0.5
    return torch.stack((x.expand(height, width), y[:, None].expand(height, width)))


def _to_sampling_grid(positions: Tensor, height: int, width: int) -> Tensor:
    """Pixel positions ``(..., 2)`` -> grid_sample coordinates (align_corners=False).

    With align_corners=False, -1 and +1 are the outer edges of the first and last pixels, i.e.
    x = 0 and x = W, so x -> 2 x / W - 1 maps the centre j + 0.5 onto grid_sample's own centre
    of column j.
    """
    scale = positions.new_tensor([2.0 / width, 2.0 / height])
    return positions * scale - 1.0


# --------------------------------------------------------------------------- random fields


@dataclass(frozen=True)
class _GaussianBumps:
    """Parameters of the signed Gaussian mixture of each field component (K bumps each).

    Attributes:
        centres: ``(2, K, 2)`` bump centres ``(x, y)`` in normalised coordinates [0, 1]^2.
        covariances: ``(2, K, 2, 2)`` SPD covariances in normalised coordinates.
        signs: ``(2, K)`` entries +-1.
    """

    centres: Tensor
    covariances: Tensor
    signs: Tensor

    @property
    def weights(self) -> Tensor:
        """``(2, K)`` signed peak heights: the normalised Gaussian density, as the authors use."""
        return self.signs / (2 * math.pi * torch.linalg.det(self.covariances).sqrt())


def _random_spd_2x2(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Random SPD 2 x 2 matrices ``Q diag(l) Q^T`` with eigenvalues l ~ U[1, 2), Q a random rotation.

    This is the spectrum of sklearn's ``make_spd_matrix`` (the authors' call): eigenvalues in
    [1, 2) keep every bump well conditioned (no needle-thin bump), which bounds the gradient
    of the field (see `random_field`). A A^T + eps I would allow near-singular covariances.

    Returns:
        ``(*shape, 2, 2)`` float64.
    """
    angle = torch.rand(shape, generator=generator, dtype=torch.float64) * math.pi
    eigenvalues = 1.0 + torch.rand((*shape, 2), generator=generator, dtype=torch.float64)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.stack((torch.stack((cos, -sin), -1), torch.stack((sin, cos), -1)), -2)
    return rotation @ torch.diag_embed(eigenvalues) @ rotation.transpose(-1, -2)


def _random_bumps(n_bumps: int, cov_scale: float, generator: torch.Generator) -> _GaussianBumps:
    """Draws the bump parameters of both components (fixed draw order: reproducible)."""
    centres = torch.rand((2, n_bumps, 2), generator=generator, dtype=torch.float64)
    signs = torch.randint(0, 2, (2, n_bumps), generator=generator).to(torch.float64) * 2 - 1
    covariances = cov_scale * _random_spd_2x2((2, n_bumps), generator)
    return _GaussianBumps(centres=centres, covariances=covariances, signs=signs)


def _evaluate_bumps(bumps: _GaussianBumps, height: int, width: int) -> Tensor:
    """Sums each component's bumps at the pixel centres, in normalised coordinates.

    Returns:
        ``(2, H, W)`` float64, unstretched.
    """
    # Normalising each axis by its own length maps the tile onto [0, 1]^2 as in the recipe;
    # on a non-square tile the bumps are therefore stretched along the longer axis.
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    y = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    precisions = torch.linalg.inv(bumps.covariances)  # (2, K, 2, 2)
    weights = bumps.weights
    total = torch.zeros(2, height, width, dtype=torch.float64)
    # One bump at a time: memory stays at a few (2, H, W) arrays whatever K is.
    for k in range(bumps.centres.shape[1]):
        dx = x.view(1, 1, width) - bumps.centres[:, k, 0].view(2, 1, 1)
        dy = y.view(1, height, 1) - bumps.centres[:, k, 1].view(2, 1, 1)
        p = precisions[:, k].view(2, 1, 1, 2, 2)  # broadcasts against (2, H, W)
        quadratic = p[..., 0, 0] * dx**2 + 2 * p[..., 0, 1] * dx * dy + p[..., 1, 1] * dy**2
        total += weights[:, k].view(2, 1, 1) * torch.exp(-0.5 * quadratic)
    return total


def _stretch_to_unit(field: Tensor) -> Tensor:
    """Min-max stretches each component of a ``(2, H, W)`` field onto [-1, 1] (constant -> 0)."""
    flat = field.flatten(1)
    low, high = flat.min(1).values.view(2, 1, 1), flat.max(1).values.view(2, 1, 1)
    spread = high - low
    # A constant component (1-pixel tile) has no direction to stretch: it stays at 0.
    safe_spread = torch.where(spread > 0, spread, torch.ones_like(spread))
    return torch.where(spread > 0, 2 * (field - low) / safe_spread - 1, torch.zeros_like(field))


def random_field(height: int, width: int, *, amplitude: float, generator: torch.Generator,
                 n_bumps: int = 30, cov_scale: float = 0.002, dtype: torch.dtype = torch.float32) -> Tensor:
    """A smooth random displacement field: the authors' Gaussian-mixture recipe.

    Per component (dx and dy independently): ``n_bumps`` Gaussian bumps with random centres
    uniform in the normalised tile [0, 1]^2, random signs, and covariance ``cov_scale * S``
    with S = Q diag(l) Q^T, l ~ U[1, 2)^2, Q a uniformly random rotation (the spectrum of
    sklearn's ``make_spd_matrix``, which the authors call). Each bump is the normalised
    Gaussian density (as in the authors' code; only relative heights survive the stretch).
    The sum is min-max stretched to [-1, 1] per component, then multiplied by ``amplitude``:
    each component attains exactly -amplitude and +amplitude.

    Scale: a bump's standard deviation is ``sqrt(cov_scale * l) * W`` pixels, 4.5 to 6.3 % of
    the tile with the defaults (the authors drew fields over whole 5000-px Inria tiles). The
    field's gradient is of order ``amplitude / std``; when it approaches 1 the map
    ``p -> p + φ(p)`` folds, so keep ``amplitude`` well below the bump width of your tile.

    Args:
        height: H, rows of the tile.
        width: W, columns of the tile.
        amplitude: max |component| of the field, in pixels.
        generator: the source of randomness; equal generator states give equal fields.
        n_bumps: bumps per component (30 in the paper).
        cov_scale: covariance scale in normalised coordinates (0.002 in the paper).
        dtype: floating dtype of the result (computed in float64 regardless).

    Returns:
        ``(2, H, W)`` field in pixels (channel 0 = dx, channel 1 = dy).
    """
    _check_tile_size(height, width)
    _check_amplitude(amplitude)
    _check_generator(generator)
    if n_bumps < 1:
        raise ValueError(f"n_bumps must be >= 1, got {n_bumps}")
    if not cov_scale > 0:
        raise ValueError(f"cov_scale must be > 0, got {cov_scale}")
    bumps = _random_bumps(n_bumps, cov_scale, generator)
    return (amplitude * _stretch_to_unit(_evaluate_bumps(bumps, height, width))).to(dtype)


def control_grid_field(height: int, width: int, *, amplitude: float, generator: torch.Generator,
                       grid: int = 4, mode: str = "bicubic", dtype: torch.dtype = torch.float32) -> Tensor:
    """A cheap smooth random field: N(0, 1) vectors on a coarse grid, upsampled, stretched.

    The ``grid x grid`` control vectors sit on the corner pixel centres and evenly between them
    (``interpolate(..., align_corners=True)``). Same amplitude convention as `random_field`:
    each component is min-max stretched so that it attains exactly -amplitude and +amplitude
    (stretching after upsampling also absorbs bicubic overshoot).

    Args:
        height: H, rows of the tile.
        width: W, columns of the tile.
        amplitude: max |component| of the field, in pixels.
        generator: the source of randomness.
        grid: control points per axis (>= 2); the field varies on a scale of W / (grid - 1).
        mode: "bicubic" (C^1 field) or "bilinear" (piecewise bilinear).
        dtype: floating dtype of the result.

    Returns:
        ``(2, H, W)`` field in pixels.
    """
    _check_tile_size(height, width)
    _check_amplitude(amplitude)
    _check_generator(generator)
    if grid < 2:
        raise ValueError(f"grid must be >= 2 control points per axis, got {grid}")
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    control = torch.randn((1, 2, grid, grid), generator=generator, dtype=torch.float64)
    dense = F.interpolate(control, size=(height, width), mode=mode, align_corners=True)[0]
    return (amplitude * _stretch_to_unit(dense)).to(dtype)


# --------------------------------------------------------------------------- sampling and warping


def field_at(field: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of a field at arbitrary ``(x, y)`` pixel positions (border clamped).

    Exact for a field that is an affine function of position, for points between the
    outermost pixel centres (``0.5 <= x <= W - 0.5``, same for y).

    Args:
        field: ``(2, H, W)`` or ``(B, 2, H, W)``.
        points: ``(n, 2)`` for an unbatched field, ``(B, n, 2)`` for a batched one; floating.

    Returns:
        ``(n, 2)`` or ``(B, n, 2)`` displacements ``(dx, dy)`` in the dtype of ``points``.
    """
    _check_field(field)
    batched = field.ndim == 4
    expected_ndim = 3 if batched else 2
    if points.ndim != expected_ndim or points.shape[-1] != 2:
        want = "(B, n, 2)" if batched else "(n, 2)"
        raise ValueError(f"points must have shape {want} for a field of shape {tuple(field.shape)}, "
                         f"got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise TypeError(f"points must be floating point, got {points.dtype}")
    fields = field if batched else field[None]
    queries = points if batched else points[None]
    if queries.shape[0] != fields.shape[0]:
        raise ValueError(f"batch sizes differ: field {fields.shape[0]}, points {queries.shape[0]}")
    height, width = fields.shape[-2:]
    grid = _to_sampling_grid(queries, height, width)[:, None]  # (B, 1, n, 2)
    # Sample in the points' precision: polygons are float64, and rounding a vertex to float32
    # would already move it by ~1e-5 px on a large tile.
    sampled = F.grid_sample(fields.to(queries.dtype), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)  # (B, 2, 1, n)
    values = sampled[:, :, 0].transpose(1, 2)
    return values if batched else values[0]


def _flatten_polygons(polygons: Polygons) -> tuple[Tensor, Callable[[Tensor], Polygons]]:
    """All vertices as one ``(N, 2)`` tensor, and the function that restores the structure."""
    if isinstance(polygons, Tensor):
        if polygons.ndim != 2 or polygons.shape[1] != 2:
            raise ValueError(f"a polygon must have shape (n, 2), got {tuple(polygons.shape)}")
        return polygons, lambda vertices: vertices
    polygons = list(polygons)
    for index, polygon in enumerate(polygons):
        if not isinstance(polygon, Tensor) or polygon.ndim != 2 or polygon.shape[1] != 2:
            shape = tuple(polygon.shape) if isinstance(polygon, Tensor) else type(polygon).__name__
            raise ValueError(f"polygon {index} must be an (n, 2) tensor, got {shape}")
    if not polygons:
        return torch.zeros(0, 2, dtype=torch.float64), lambda vertices: []
    sizes = [len(polygon) for polygon in polygons]
    return torch.cat(polygons), lambda vertices: list(vertices.split(sizes))


def _check_single_field(field: Tensor) -> None:
    _check_field(field)
    if field.ndim != 3:
        raise ValueError(f"polygons live on one tile: field must have shape (2, H, W), got {tuple(field.shape)}")


def move_polygons(polygons: Polygons, field: Tensor, *, iterations: int = 1) -> Polygons:
    """Misaligns polygons by a field: ``v' = v - φ(v)`` (the convention of the warp).

    ``iterations = k`` runs k steps of the fixed point ``v'_{t+1} = v - φ(v'_t)`` from
    ``v'_0 = v``: k = 1 is the first-order move ``v - φ(v)``; more steps converge (when
    ``max |∇φ| < 1``) to the exact solution of ``v' + φ(v') = v``, i.e. the vertices of the
    warped raster ``warp_image(M, φ)``, and then `align_polygons` undoes the move exactly.

    Args:
        polygons: one ``(n, 2)`` polygon or a list of them (a cadaster), pixel coordinates.
        field: ``(2, H, W)`` displacement field of the tile.
        iterations: fixed-point steps, >= 1.

    Returns:
        The moved polygons, same structure and dtype.
    """
    _check_single_field(field)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    vertices, restore = _flatten_polygons(polygons)
    if len(vertices) == 0:
        return restore(vertices)
    moved = vertices
    for _ in range(iterations):
        moved = vertices - field_at(field, moved)
    return restore(moved)


def align_polygons(polygons: Polygons, field: Tensor) -> Polygons:
    """Aligns misaligned polygons with a (predicted) field: ``v = v' + φ(v')``.

    The inverse of `move_polygons` to first order: ``align(move(P, φ), φ) - P`` is
    ``O(|∇φ| |φ|)`` for the one-step move, and vanishes for the converged one.

    Args:
        polygons: one ``(n, 2)`` polygon or a list of them, pixel coordinates.
        field: ``(2, H, W)`` displacement field of the tile.

    Returns:
        The aligned polygons, same structure and dtype.
    """
    _check_single_field(field)
    vertices, restore = _flatten_polygons(polygons)
    if len(vertices) == 0:
        return restore(vertices)
    return restore(vertices + field_at(field, vertices))


def warp_image(image: Tensor, field: Tensor, *, mode: str = "bilinear") -> Tensor:
    """Samples an image at ``p + φ(p)``: ``warp_image(I, φ)(p) = I(p + φ(p))``.

    A constant field (3, -2) thus shifts the content 3 px left and 2 px down
    (``torch.roll(I, (2, -3), dims=(-2, -1))`` away from the borders). Outside the image the
    border value is repeated.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)``, floating point.
        field: ``(2, H, W)`` or ``(B, 2, H, W)``; an unbatched image or field is shared by the
            whole batch of the other.
        mode: "bilinear" or "nearest" (grid_sample modes).

    Returns:
        ``(C, H, W)`` if both inputs are unbatched, else ``(B, C, H, W)``; the image's dtype.
    """
    _check_image(image)
    _check_field(field)
    _check_same_spatial_size(image=image, field=field)
    batched = image.ndim == 4 or field.ndim == 4
    images = image if image.ndim == 4 else image[None]
    fields = (field if field.ndim == 4 else field[None]).to(image.dtype)
    if images.shape[0] != fields.shape[0]:
        if images.shape[0] != 1 and fields.shape[0] != 1:
            raise ValueError(f"batch sizes differ: image {images.shape[0]}, field {fields.shape[0]}")
        batch = max(images.shape[0], fields.shape[0])
        images, fields = images.expand(batch, *images.shape[1:]), fields.expand(batch, *fields.shape[1:])
    height, width = images.shape[-2:]
    positions = pixel_centres(height, width, dtype=image.dtype, device=image.device) + fields
    grid = _to_sampling_grid(positions.permute(0, 2, 3, 1), height, width)  # (B, H, W, 2)
    warped = F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)
    return warped if batched else warped[0]


def compose(phi: Tensor, psi: Tensor) -> Tensor:
    """The field of warping by ``psi`` first, then by ``phi``: ``phi + psi∘(id + phi)``.

    ``warp(warp(I, psi), phi)(p) = warp(I, psi)(p + phi(p)) = I(q + psi(q))`` with
    ``q = p + phi(p)``, so the composite field is ``phi(p) + psi(p + phi(p))``, i.e.
    ``phi + warp_image(psi, phi)`` (psi is read bilinearly, border clamped).

    Args:
        phi: ``(2, H, W)`` or ``(B, 2, H, W)``, applied second.
        psi: same shape, applied first.

    Returns:
        The composite field, shape of the broadcast of the two.
    """
    _check_field(phi, "phi")
    _check_field(psi, "psi")
    return phi + warp_image(psi, phi)


def inverse_approx(phi: Tensor) -> Tensor:
    """Approximate inverse of a warp field: ``-phi∘(id - phi)``.

    ``compose(phi, inverse_approx(phi))`` is ``O(|∇φ|^2 |φ| + |∇²φ| |∇φ| |φ|^2)`` instead of the
    ``O(|∇φ| |φ|)`` that plain negation leaves.

    Args:
        phi: ``(2, H, W)`` or ``(B, 2, H, W)``.

    Returns:
        The approximate inverse, same shape.
    """
    _check_field(phi, "phi")
    return -warp_image(phi, -phi)


def scale_field(field: Tensor, factor: float) -> Tensor:
    """Moves a field between scales of the multiscale chain.

    Coordinates scale as ``x' = factor * x`` (the tile [0, W] becomes [0, factor W]), so the
    grid is resampled (bilinear, centre-aligned; antialiased when shrinking) and the vectors
    are multiplied by ``factor``. ``factor * H`` and ``factor * W`` must be integers, so that no
    pixel is silently cropped and the coordinate map stays exact.

    Args:
        field: ``(2, H, W)`` or ``(B, 2, H, W)``, in pixels of its own scale.
        factor: > 0; 0.5 goes to the next coarser scale, 2 to the next finer one.

    Returns:
        ``(2, H', W')`` or ``(B, 2, H', W')`` with ``H' = factor H``, in pixels of the new scale.
    """
    _check_field(field)
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be finite and > 0, got {factor!r}")
    height, width = field.shape[-2:]
    new_size = []
    for size in (height, width):
        scaled = size * factor
        if abs(scaled - round(scaled)) > 1e-6 * max(1.0, scaled) or round(scaled) < 1:
            raise ValueError(f"factor {factor} maps size {size} to {scaled}, not a positive integer; "
                             "crop or pad the tile to a multiple of the scale step")
        new_size.append(round(scaled))
    fields = field if field.ndim == 4 else field[None]
    resampled = F.interpolate(fields, size=tuple(new_size), mode="bilinear", align_corners=False,
                              antialias=factor < 1)
    resampled = resampled * factor
    return resampled if field.ndim == 4 else resampled[0]


# --------------------------------------------------------------------------- augmentations


def _rotate_vectors(field: Tensor, k: int) -> Tensor:
    """Rotates the ``(dx, dy)`` vectors of a field by k quarter turns (as `rotate90`)."""
    dx, dy = field.unbind(-3)
    rotated = {0: (dx, dy), 1: (dy, -dx), 2: (-dx, -dy), 3: (-dy, dx)}[k]
    return torch.stack(rotated, dim=-3)


def _check_quarter_turns(k: int) -> int:
    if not isinstance(k, int):
        raise TypeError(f"k (quarter turns) must be an int, got {type(k).__name__}")
    return k % 4


def rotate90(image: Tensor | None, raster: Tensor | None, field: Tensor | None,
             k: int = 1) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Rotates an image, its raster and its field by k quarter turns, consistently.

    Orientation: that of ``torch.rot90(t, k, dims=(-2, -1))``, counter-clockwise as displayed
    (rows downwards). With an ``(H, W)`` tile, positions move as (use `rotate90_polygons`):
    k = 1: ``(x, y) -> (y, W - x)``; k = 2: ``(W - x, H - y)``; k = 3: ``(H - y, x)``;
    vectors by the linear part: k = 1: ``(dx, dy) -> (dy, -dx)``. The field's grid and its
    vectors are both rotated, ``φ'(T p) = R φ(p)``, so warping, moving polygons and aligning
    commute with the rotation.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)``, or None.
        raster: ``(C, H, W)`` or ``(B, C, H, W)``, or None.
        field: ``(2, H, W)`` or ``(B, 2, H, W)``, or None.
        k: quarter turns (any int; taken mod 4).

    Returns:
        ``(image, raster, field)`` rotated (None stays None); spatial size ``(W, H)`` for odd k.
    """
    k = _check_quarter_turns(k)
    if field is not None:
        _check_field(field)
    _check_same_spatial_size(image=image, raster=raster, field=field)

    def rotate_grid(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else torch.rot90(tensor, k, dims=(-2, -1))

    rotated_field = None if field is None else _rotate_vectors(rotate_grid(field), k)
    return rotate_grid(image), rotate_grid(raster), rotated_field


def flip(image: Tensor | None, raster: Tensor | None, field: Tensor | None,
         axis: str) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Mirrors an image, its raster and its field, consistently.

    ``axis = "x"`` mirrors left-right: ``(x, y) -> (W - x, y)``, ``(dx, dy) -> (-dx, dy)``;
    ``axis = "y"`` mirrors top-bottom: ``(x, y) -> (x, H - y)``, ``(dx, dy) -> (dx, -dy)``.

    Args:
        image: ``(C, H, W)`` or ``(B, C, H, W)``, or None.
        raster: ``(C, H, W)`` or ``(B, C, H, W)``, or None.
        field: ``(2, H, W)`` or ``(B, 2, H, W)``, or None.
        axis: "x" or "y", the coordinate that changes sign.

    Returns:
        ``(image, raster, field)`` mirrored (None stays None).
    """
    if axis not in FLIP_AXES:
        raise ValueError(f"axis must be 'x' (left-right) or 'y' (top-bottom), got {axis!r}")
    if field is not None:
        _check_field(field)
    _check_same_spatial_size(image=image, raster=raster, field=field)
    dim = -1 if axis == "x" else -2

    def flip_grid(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else torch.flip(tensor, dims=(dim,))

    flipped_field = None
    if field is not None:
        sign = field.new_tensor([-1.0, 1.0] if axis == "x" else [1.0, -1.0]).view(2, 1, 1)
        flipped_field = flip_grid(field) * sign
    return flip_grid(image), flip_grid(raster), flipped_field


def rotate90_polygons(polygons: Polygons, k: int, height: int, width: int) -> Polygons:
    """Polygon coordinates under `rotate90` of an ``(H, W)`` tile (H, W before rotation).

    Args:
        polygons: one ``(n, 2)`` polygon or a list of them.
        k: quarter turns (mod 4), as in `rotate90`.
        height: H of the tile before rotation.
        width: W of the tile before rotation.

    Returns:
        The rotated polygons, same structure.
    """
    k = _check_quarter_turns(k)
    _check_tile_size(height, width)
    vertices, restore = _flatten_polygons(polygons)
    x, y = vertices.unbind(-1)
    rotated = {0: (x, y), 1: (y, width - x), 2: (width - x, height - y), 3: (height - y, x)}[k]
    return restore(torch.stack(rotated, dim=-1))


def flip_polygons(polygons: Polygons, axis: str, height: int, width: int) -> Polygons:
    """Polygon coordinates under `flip` of an ``(H, W)`` tile.

    Args:
        polygons: one ``(n, 2)`` polygon or a list of them.
        axis: "x" (``x -> W - x``) or "y" (``y -> H - y``).
        height: H of the tile.
        width: W of the tile.

    Returns:
        The mirrored polygons, same structure.
    """
    if axis not in FLIP_AXES:
        raise ValueError(f"axis must be 'x' (left-right) or 'y' (top-bottom), got {axis!r}")
    _check_tile_size(height, width)
    vertices, restore = _flatten_polygons(polygons)
    x, y = vertices.unbind(-1)
    mirrored = (width - x, y) if axis == "x" else (x, height - y)
    return restore(torch.stack(mirrored, dim=-1))
