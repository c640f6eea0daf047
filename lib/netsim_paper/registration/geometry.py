"""Registration geometry: polygons, their rasters at any scale, and the loss weights.

Conventions (shared with every module of `netsim_paper.registration`):

* A polygon is an ``(n, 2)`` float64 tensor of vertices ``(x, y)`` in pixels of the
  full-resolution tile: x = column, y = row, pixel ``(row i, col j)`` has its centre at
  ``(j + 0.5, i + 0.5)``, so an ``H x W`` tile spans ``[0, W] x [0, H]``. The ring is closed
  implicitly (first vertex not repeated) and may turn either way. A cadaster is a ``list``
  of polygons.
* Images are ``(3, H, W)`` float32 in [0, 1]; rasters ``(C, H, W)`` float32.

The registration network sees a cadaster as its `rasterize`d (fill, edge, vertex) channels
and is trained with `loss_weights` of them; the scene generator (`scenes`) uses the same
even-odd fill and outline distances (`polygon_patch`) to place and paint its buildings.

Example:
    >>> import torch
    >>> from netsim_paper.registration.geometry import loss_weights, rasterize
    >>> square = torch.tensor([[10.0, 10.0], [20.0, 10.0], [20.0, 20.0], [10.0, 20.0]])
    >>> raster = rasterize([square], 64, 64, scale=0.5)   # (3, 32, 32)
    >>> raster.shape, int(rasterize([square], 64, 64)[0].sum())
    (torch.Size([3, 32, 32]), 100)
    >>> loss_weights(raster).shape
    torch.Size([32, 32])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EDGE_WEIGHT",
    "FILL_WEIGHT",
    "VERTEX_WEIGHT",
    "PolygonPatch",
    "as_polygon",
    "distance_to_segments",
    "loss_weights",
    "pixel_centre_grid",
    "polygon_patch",
    "rasterize",
]

#: Per-pixel loss weights of the registration network (background weighs 0).
FILL_WEIGHT = 0.1
EDGE_WEIGHT = 1.0
VERTEX_WEIGHT = 10.0

#: Edge full width and vertex radius never shrink below these many output pixels, so
#: thin features survive downsampling (0.75 px: every point has a pixel centre that close).
MIN_EDGE_WIDTH_PX = 1.0
MIN_VERTEX_RADIUS_PX = 0.75


# =========================================================================================
# Polygons and rasterisation
# =========================================================================================

def as_polygon(vertices, *, name: str = "polygon") -> Tensor:
    """Validate and convert vertices to the shared polygon convention.

    Args:
        vertices: array-like ``(n, 2)`` of ``(x, y)`` pixel coordinates, n >= 3.
        name: how to call it in error messages.

    Returns:
        ``(n, 2)`` float64 tensor (a copy when a conversion was needed).

    Raises:
        ValueError: wrong shape, fewer than 3 vertices, or non-finite coordinates.
    """
    polygon = torch.as_tensor(vertices, dtype=torch.float64)
    if polygon.ndim != 2 or polygon.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n, 2) of (x, y) vertices, got {tuple(polygon.shape)}")
    if polygon.shape[0] < 3:
        raise ValueError(f"{name} needs at least 3 vertices, got {polygon.shape[0]}")
    if not torch.isfinite(polygon).all():
        raise ValueError(f"{name} has non-finite coordinates")
    return polygon


def pixel_centre_grid(y0: int, y1: int, x0: int, x1: int) -> tuple[Tensor, Tensor]:
    """Centres of the pixels in rows [y0, y1) and columns [x0, x1): two (hc, wc) float64."""
    ys = torch.arange(y0, y1, dtype=torch.float64) + 0.5
    xs = torch.arange(x0, x1, dtype=torch.float64) + 0.5
    return torch.meshgrid(ys, xs, indexing="ij")[::-1]  # (px, py)


def _crop_around(polygon: Tensor, pad: float, height: int, width: int) -> tuple[int, int, int, int] | None:
    """Pixel box [y0, y1) x [x0, x1) holding the polygon grown by `pad`, clipped to the tile."""
    lo = polygon.min(0).values - pad
    hi = polygon.max(0).values + pad
    x0, y0 = max(int(math.floor(lo[0])), 0), max(int(math.floor(lo[1])), 0)
    x1, y1 = min(int(math.ceil(hi[0])), width), min(int(math.ceil(hi[1])), height)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1


def _inside_even_odd(px: Tensor, py: Tensor, polygon: Tensor) -> Tensor:
    """Even-odd point-in-polygon test of many points against one ring.

    A horizontal ray from each point to +x crosses edge (a, b) when the edge straddles the
    point's row (half-open in y, so a vertex on the row is counted once) and the crossing
    lies right of the point.

    Args:
        px, py: (...) point coordinates.
        polygon: (n, 2) vertices.

    Returns:
        (...) bool, True inside.
    """
    xa, ya = polygon[:, 0], polygon[:, 1]
    xb, yb = polygon.roll(-1, 0)[:, 0], polygon.roll(-1, 0)[:, 1]
    qx, qy = px.unsqueeze(-1), py.unsqueeze(-1)
    straddles = (ya > qy) != (yb > qy)
    dy = torch.where(yb == ya, torch.ones_like(ya), yb - ya)  # horizontal edges never straddle
    x_cross = xa + (qy - ya) * (xb - xa) / dy
    crossings = straddles & (qx < x_cross)
    return crossings.sum(-1) % 2 == 1


def distance_to_segments(px: Tensor, py: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Euclidean distance from each point to the nearest of m segments.

    Args:
        px, py: (...) point coordinates.
        starts, ends: (m, 2) segment end points.

    Returns:
        (...) distances.
    """
    d = ends - starts
    length2 = (d * d).sum(1).clamp_min(1e-18)
    rx, ry = px.unsqueeze(-1) - starts[:, 0], py.unsqueeze(-1) - starts[:, 1]
    t = ((rx * d[:, 0] + ry * d[:, 1]) / length2).clamp(0.0, 1.0)
    return torch.hypot(rx - t * d[:, 0], ry - t * d[:, 1]).amin(-1)


def _distance_to_points(px: Tensor, py: Tensor, points: Tensor) -> Tensor:
    """(...) distance from each point to the nearest of the (m, 2) `points`."""
    return torch.hypot(px.unsqueeze(-1) - points[:, 0], py.unsqueeze(-1) - points[:, 1]).amin(-1)


@dataclass(frozen=True)
class PolygonPatch:
    """A polygon's rasterisation on the pixel box around it (all arrays (hc, wc))."""

    y0: int
    x0: int
    px: Tensor
    py: Tensor
    inside: Tensor          # bool, pixel centre inside (even-odd)
    boundary_distance: Tensor  # distance from the pixel centre to the polygon's outline

    @property
    def signed_distance(self) -> Tensor:
        """Positive inside, negative outside."""
        return torch.where(self.inside, self.boundary_distance, -self.boundary_distance)

    def coverage(self) -> Tensor:
        """Antialiased fill: the area fraction of a pixel inside, to first order."""
        return (0.5 + self.signed_distance).clamp(0.0, 1.0)

    def slices(self) -> tuple[slice, slice]:
        """Where the box sits in the full raster: (rows, cols)."""
        return slice(self.y0, self.y0 + self.px.shape[0]), slice(self.x0, self.x0 + self.px.shape[1])


def polygon_patch(polygon: Tensor, height: int, width: int, pad: float = 1.5) -> PolygonPatch | None:
    """Even-odd fill and outline distance on the pixel box around a polygon (None if off-tile)."""
    box = _crop_around(polygon, pad, height, width)
    if box is None:
        return None
    y0, y1, x0, x1 = box
    px, py = pixel_centre_grid(y0, y1, x0, x1)
    inside = _inside_even_odd(px, py, polygon)
    distance = distance_to_segments(px, py, polygon, polygon.roll(-1, 0))
    return PolygonPatch(y0, x0, px, py, inside, distance)


def rasterize(
    polygons: Sequence,
    height: int,
    width: int,
    *,
    scale: float = 1.0,
    edge_width: float = 2.0,
    vertex_radius: float = 2.0,
    antialias: bool = False,
) -> Tensor:
    """Rasterise a cadaster into fill, edge and vertex channels at any scale.

    The raster at ``scale`` s has ``h = round(height * s)`` rows and ``w = round(width * s)``
    columns; polygon coordinates are multiplied by s, so output pixel ``(i, j)`` has its
    centre at full-resolution point ``((j + 0.5) / s, (i + 0.5) / s)``, the centre of the
    block that ``avg_pool2d`` with kernel 1/s would average. Widths are given in
    full-resolution pixels and scaled too, but the edge never gets thinner than
    `MIN_EDGE_WIDTH_PX` and a vertex disc never smaller than `MIN_VERTEX_RADIUS_PX` output
    pixels, so every edge and vertex leaves a mark at coarse scales.

    * fill: pixel centre inside a polygon (even-odd rule; overlapping polygons are unioned).
    * edge: distance from the pixel centre to a polygon side <= edge width / 2.
    * vertex: distance from the pixel centre to a vertex <= vertex radius.

    With ``antialias=False`` (default) the channels are exactly 0 or 1 by these rules (an
    axis-aligned square from (10, 10) to (20, 20) fills exactly 100 pixels). With
    ``antialias=True`` each test is replaced by a one-pixel linear ramp centred on the same
    boundary (e.g. edge = clip(width/2 + 0.5 - distance, 0, 1)), a first-order estimate of the
    area fraction covered, still in [0, 1].

    Args:
        polygons: the cadaster, a sequence of ``(n, 2)`` (x, y) vertex arrays (may be empty).
        height, width: full-resolution tile size H, W in pixels.
        scale: output resolution relative to the tile (0.25 = 4x smaller).
        edge_width: full width of the edge band, in full-resolution pixels.
        vertex_radius: radius of the vertex discs, in full-resolution pixels.
        antialias: soft one-pixel ramps instead of hard 0/1 tests.

    Returns:
        ``(3, h, w)`` float32 with channels (fill, edge, vertex), each in [0, 1].

    Raises:
        ValueError: a malformed polygon, a non-positive size or scale, negative widths.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"tile size must be positive, got height={height}, width={width}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if edge_width < 0 or vertex_radius < 0:
        raise ValueError(f"edge_width and vertex_radius must be >= 0, got {edge_width}, {vertex_radius}")
    h, w = max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)
    half_edge = max(edge_width * scale, MIN_EDGE_WIDTH_PX) / 2
    radius = max(vertex_radius * scale, MIN_VERTEX_RADIUS_PX)
    raster = torch.zeros(3, h, w, dtype=torch.float32)
    pad = max(half_edge, radius) + 1.5  # the antialiasing ramp reaches half a pixel further
    for index, vertices in enumerate(polygons):
        polygon = as_polygon(vertices, name=f"polygon {index}") * scale
        patch = polygon_patch(polygon, h, w, pad)
        if patch is None:
            continue
        vertex_distance = _distance_to_points(patch.px, patch.py, polygon)
        if antialias:
            fill = patch.coverage()
            edge = (half_edge + 0.5 - patch.boundary_distance).clamp(0.0, 1.0)
            vertex = (radius + 0.5 - vertex_distance).clamp(0.0, 1.0)
        else:
            fill = patch.inside.double()
            edge = (patch.boundary_distance <= half_edge).double()
            vertex = (vertex_distance <= radius).double()
        rows, cols = patch.slices()
        raster[:, rows, cols] = torch.maximum(raster[:, rows, cols], torch.stack([fill, edge, vertex]).float())
    return raster


def loss_weights(raster: Tensor, *, fill_weight: float = FILL_WEIGHT, edge_weight: float = EDGE_WEIGHT,
                 vertex_weight: float = VERTEX_WEIGHT) -> Tensor:
    """Per-pixel loss weights of the registration network from a (fill, edge, vertex) raster.

    ``weight = max(fill_weight * fill, edge_weight * edge, vertex_weight * vertex)``: 0 on the
    background, 0.1 inside buildings, 1 on their outlines, 10 at their corners (the paper's
    weighting, which makes the few pixels that pin a polygon down dominate the loss).

    Args:
        raster: ``(..., 3, h, w)`` from `rasterize` (a batch dimension is allowed).

    Returns:
        ``(..., h, w)`` float weights.
    """
    if raster.ndim < 3 or raster.shape[-3] != 3:
        raise ValueError(f"raster must have shape (..., 3, h, w) = (fill, edge, vertex), got {tuple(raster.shape)}")
    fill, edge, vertex = raster.unbind(-3)
    return torch.maximum(torch.maximum(fill_weight * fill, edge_weight * edge), vertex_weight * vertex)

