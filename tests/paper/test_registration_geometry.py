"""The cadaster rasteriser and the loss weights (netsim_paper.registration.geometry).

The rasteriser is checked against exact counts and against a plain per-pixel reference
(a Python loop over pixel centres, written from the definitions; the scene tests reuse it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from netsim_paper.registration.geometry import (
    EDGE_WEIGHT,
    FILL_WEIGHT,
    VERTEX_WEIGHT,
    as_polygon,
    loss_weights,
    rasterize,
)


def square(x0, y0, x1, y1):
    return torch.tensor([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=torch.float64)


# --- the plain reference: one pixel at a time, straight from the definitions --------------

def inside_reference(x, y, vertices):
    inside = False
    n = len(vertices)
    for k in range(n):
        (xa, ya), (xb, yb) = vertices[k], vertices[(k + 1) % n]
        if (ya > y) != (yb > y) and x < xa + (y - ya) * (xb - xa) / (yb - ya):
            inside = not inside
    return inside


def segment_distance_reference(x, y, a, b):
    dx, dy = b[0] - a[0], b[1] - a[1]
    t = max(0.0, min(1.0, ((x - a[0]) * dx + (y - a[1]) * dy) / (dx * dx + dy * dy)))
    return math.hypot(x - a[0] - t * dx, y - a[1] - t * dy)


def rasterize_reference(polygons, h, w, half_edge, radius):
    out = np.zeros((3, h, w))
    for i in range(h):
        for j in range(w):
            x, y = j + 0.5, i + 0.5
            for poly in polygons:
                v = [tuple(map(float, p)) for p in poly]
                if inside_reference(x, y, v):
                    out[0, i, j] = 1
                sides = [(v[k], v[(k + 1) % len(v)]) for k in range(len(v))]
                if min(segment_distance_reference(x, y, a, b) for a, b in sides) <= half_edge:
                    out[1, i, j] = 1
                if min(math.hypot(x - p[0], y - p[1]) for p in v) <= radius:
                    out[2, i, j] = 1
    return torch.from_numpy(out).float()

# --- rasterize ------------------------------------------------------------------------------

def test_axis_aligned_square_exact_counts():
    raster = rasterize([square(10, 10, 20, 20)], 32, 32, edge_width=2.0, vertex_radius=2.0)
    assert raster.shape == (3, 32, 32) and raster.dtype == torch.float32
    fill, edge, vertex = raster
    assert fill.sum() == 100  # pixel centres 10.5 .. 19.5 in both axes
    assert fill[10:20, 10:20].all() and fill.sum() == fill[10:20, 10:20].sum()
    # Edge: centres within 1 px of the outline = the 12 x 12 block minus the inner 8 x 8.
    assert edge.sum() == 144 - 64
    assert edge[9:21, 9:21].sum() == 80 and edge[11:19, 11:19].sum() == 0
    # Vertex: per corner, the 12 centres within 2 px ((+-0.5, +-0.5), (+-1.5, +-0.5), (+-0.5, +-1.5)).
    assert vertex.sum() == 4 * 12
    assert vertex[9, 9] == 1 and vertex[15, 15] == 0 and vertex[10, 15] == 0


def test_orientation_and_closing_convention_do_not_matter():
    ccw = square(3.2, 4.7, 17.9, 12.4)
    reference = rasterize([ccw], 24, 24)
    assert torch.equal(rasterize([ccw.flip(0)], 24, 24), reference)
    assert torch.equal(rasterize([ccw.numpy().tolist()], 24, 24), reference)


def test_matches_per_pixel_reference():
    rng = np.random.default_rng(3)
    polygons = []
    for _ in range(3):  # random star-shaped, partly off the tile, one self-intersecting order
        centre, n = rng.uniform(4, 28, 2), int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(3, 12, n)
        polygons.append(centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1))
    polygons.append(np.array([[2.3, 2.1], [14.6, 9.9], [2.7, 9.4], [13.8, 1.6]]))  # a bow tie: even-odd
    for scale, edge_width, radius in [(1.0, 2.0, 2.0), (0.5, 3.0, 1.0), (1.0, 0.0, 0.0)]:
        got = rasterize(polygons, 32, 32, scale=scale, edge_width=edge_width, vertex_radius=radius)
        h = round(32 * scale)
        expected = rasterize_reference([p * scale for p in polygons], h, h,
                                       half_edge=max(edge_width * scale, 1.0) / 2, radius=max(radius * scale, 0.75))
        assert torch.equal(got, expected)


def test_coarse_scales_keep_every_edge_and_vertex():
    polygon = torch.tensor([[3.3, 5.1], [61.7, 9.8], [30.2, 58.6]], dtype=torch.float64)
    raster = rasterize([polygon], 64, 64, scale=0.125, edge_width=2.0, vertex_radius=2.0)
    assert raster.shape == (3, 8, 8)
    fill, edge, vertex = raster
    for x, y in (polygon * 0.125).tolist():  # the pixel containing each vertex is marked
        assert vertex[int(y), int(x)] == 1
    # the edge band is at least 1 output pixel wide, so it is connected along each side
    for a, b in zip(polygon * 0.125, (polygon * 0.125).roll(-1, 0), strict=True):
        for t in torch.linspace(0, 1, 50):
            x, y = (a + t * (b - a)).tolist()
            i, j = min(int(y), 7), min(int(x), 7)
            assert edge[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].any()


def test_empty_cadaster_and_scale_sizes():
    assert torch.equal(rasterize([], 40, 60), torch.zeros(3, 40, 60))
    assert rasterize([], 256, 256, scale=0.25).shape == (3, 64, 64)
    assert rasterize([square(0, 0, 5, 5)], 30, 50, scale=0.5).shape == (3, 15, 25)


def test_polygons_off_the_tile_are_clipped():
    raster = rasterize([square(-10, -10, 5, 5), square(100, 100, 120, 120)], 20, 20)
    assert raster[0].sum() == 25 and raster[:, 10:, 10:].sum() == 0


def test_antialiased_channels():
    shifted = square(10.3, 10.3, 20.3, 20.3)
    soft = rasterize([shifted], 32, 32, antialias=True)
    assert soft.min() >= 0 and soft.max() <= 1
    assert abs(soft[0].sum().item() - 100.0) < 1.0  # area to first order
    hard = rasterize([shifted], 32, 32)
    assert torch.equal(soft[0] == 1, (soft[0] == 1) & (hard[0] == 1))  # full coverage only where hard fills
    assert ((soft[1] > 0) & (soft[1] < 1)).any()  # a real ramp, not a relabelled hard mask


def test_invalid_polygons_raise():
    with pytest.raises(ValueError, match="at least 3 vertices"):
        rasterize([[[0, 0], [1, 1]]], 8, 8)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        rasterize([np.zeros((4, 3))], 8, 8)
    with pytest.raises(ValueError, match="non-finite"):
        as_polygon([[0, 0], [1, float("nan")], [2, 0]])
    with pytest.raises(ValueError, match="scale"):
        rasterize([], 8, 8, scale=0)


def test_loss_weights_values():
    raster = rasterize([square(10, 10, 20, 20)], 32, 32)
    weights = loss_weights(raster)
    assert weights.shape == (32, 32)
    assert weights[0, 0] == 0  # background
    assert weights[15, 15] == pytest.approx(FILL_WEIGHT)  # interior
    assert weights[15, 10] == EDGE_WEIGHT  # on a side, away from the corners
    assert weights[10, 10] == VERTEX_WEIGHT  # a corner
    assert torch.allclose(weights.unique(), torch.tensor([0.0, FILL_WEIGHT, EDGE_WEIGHT, VERTEX_WEIGHT]))
    batch = torch.stack([raster, torch.zeros_like(raster)])
    assert torch.equal(loss_weights(batch)[0], weights) and loss_weights(batch)[1].sum() == 0
    with pytest.raises(ValueError, match="fill, edge, vertex"):
        loss_weights(torch.zeros(2, 8, 8))
