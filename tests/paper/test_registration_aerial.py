"""Synthetic aerial scenes and the cadaster rasteriser (netsim_paper.registration.aerial).

The rasteriser is checked against exact counts and against a plain per-pixel reference
(a Python loop over pixel centres, written from the definitions); the generator against
its promises: determinism, valid and disjoint footprints, working switches, and scenes
whose buildings cannot be found by colour alone.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from netsim_paper.registration.aerial import (
    EDGE_WEIGHT,
    FILL_WEIGHT,
    VERTEX_WEIGHT,
    AerialScene,
    as_polygon,
    load_pairs,
    loss_weights,
    make_scene,
    make_scenes,
    rasterize,
    scene_batch,
)

SCENE_SEEDS = range(6)


@pytest.fixture(scope="module")
def scenes() -> list[AerialScene]:
    return make_scenes(SCENE_SEEDS)


def square(x0, y0, x1, y1):
    return torch.tensor([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=torch.float64)


# --- the plain reference: one pixel at a time, straight from the definitions --------------

def _inside_reference(x, y, vertices):
    inside = False
    n = len(vertices)
    for k in range(n):
        (xa, ya), (xb, yb) = vertices[k], vertices[(k + 1) % n]
        if (ya > y) != (yb > y) and x < xa + (y - ya) * (xb - xa) / (yb - ya):
            inside = not inside
    return inside


def _segment_distance_reference(x, y, a, b):
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
                if _inside_reference(x, y, v):
                    out[0, i, j] = 1
                sides = [(v[k], v[(k + 1) % len(v)]) for k in range(len(v))]
                if min(_segment_distance_reference(x, y, a, b) for a, b in sides) <= half_edge:
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


def test_half_scale_consistent_with_downsampling(scenes):
    for scene in scenes[:3]:
        full = scene.raster(1.0)[0]
        pooled = F.avg_pool2d(full[None, None], 2)[0, 0] > 0.5
        half = scene.raster(0.5)[0] > 0.5
        assert half.shape == (128, 128)
        iou = (pooled & half).sum() / (pooled | half).sum()
        assert iou > 0.9, iou


def test_coarse_scales_keep_every_edge_and_vertex():
    polygon = torch.tensor([[3.3, 5.1], [61.7, 9.8], [30.2, 58.6]], dtype=torch.float64)
    raster = rasterize([polygon], 64, 64, scale=0.125, edge_width=2.0, vertex_radius=2.0)
    assert raster.shape == (3, 8, 8)
    fill, edge, vertex = raster
    for x, y in (polygon * 0.125).tolist():  # the pixel containing each vertex is marked
        assert vertex[int(y), int(x)] == 1
    # the edge band is at least 1 output pixel wide, so it is connected along each side
    for a, b in zip(polygon * 0.125, (polygon * 0.125).roll(-1, 0)):
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


# --- make_scene -------------------------------------------------------------------------------

def test_deterministic_by_seed_and_seeds_differ(scenes):
    again = make_scene(0)
    assert torch.equal(again.image, scenes[0].image)
    assert len(again.polygons) == len(scenes[0].polygons)
    assert all(torch.equal(a, b) for a, b in zip(again.polygons, scenes[0].polygons))
    assert not torch.equal(scenes[0].image, scenes[1].image)
    assert [p.tolist() for p in scenes[0].polygons] != [p.tolist() for p in scenes[1].polygons]


def test_global_rngs_untouched():
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    make_scene(7, size=96)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_shapes_and_ranges(scenes):
    for scene in scenes:
        h, w = scene.height, scene.width
        assert scene.image.shape == (3, 256, 256) and scene.image.dtype == torch.float32
        assert scene.image.min() >= 0 and scene.image.max() <= 1
        assert 0.15 < scene.image.mean() < 0.7 and scene.image.std() > 0.03
        b = len(scene.polygons)
        assert 3 <= b <= 40, b
        assert scene.building_heights.shape == (b,) and len(scene.roof_kinds) == b
        assert set(scene.roof_kinds) <= {"gable", "hip", "flat"}
        assert ((scene.building_visibility >= 0) & (scene.building_visibility <= 1)).all()
        for mask in (scene.road_mask, scene.paved_mask, scene.shed_mask):
            assert mask.shape == (h, w) and mask.dtype == torch.bool
        for soft in (scene.tree_mask, scene.shadow_mask):
            assert soft.shape == (h, w) and soft.min() >= 0 and soft.max() <= 1
        assert scene.tree_centres.shape == (len(scene.tree_radii), 2)
        assert torch.linalg.norm(scene.sun_direction) == pytest.approx(1.0)
        assert scene.road_mask.any()


def test_polygons_valid_inside_tile_and_house_sized(scenes):
    for scene in scenes:
        for polygon in scene.polygons:
            assert polygon.dtype == torch.float64 and polygon.shape[1] == 2 and polygon.shape[0] in (4, 6)
            assert (polygon >= 0).all()
            assert (polygon[:, 0] <= scene.width).all() and (polygon[:, 1] <= scene.height).all()
            sides = (polygon.roll(-1, 0) - polygon).norm(dim=1) * scene.gsd  # metres
            assert 8 - 1e-6 <= sides.max() <= 25 + 1e-6  # the longest side of a house is 8-25 m


def _polygon_distance(p, q):
    """Exact distance between two disjoint polygons' outlines (vertex-to-segment, both ways)."""
    def one_way(a, b):
        return min(_segment_distance_reference(x, y, b[k], b[(k + 1) % len(b)]) for x, y in a for k in range(len(b)))
    p, q = p.tolist(), q.tolist()
    return min(one_way(p, q), one_way(q, p))


def test_footprints_never_overlap(scenes):
    for scene in scenes:
        fills = torch.stack([rasterize([p], scene.height, scene.width)[0] for p in scene.polygons])
        assert fills.sum(0).max() <= 1  # no pixel in two footprints
        for i, p in enumerate(scene.polygons):
            for q in scene.polygons[i + 1:]:
                assert not any(_inside_reference(x, y, q.tolist()) for x, y in p.tolist())
                assert _polygon_distance(p, q) >= 1.0  # at least ~1.5 m apart by construction


def test_buildings_differ_from_background_but_not_by_colour_alone(scenes):
    """The best per-pixel colour rule cannot find the buildings.

    The rule is the Bayes classifier on a 32^3 RGB histogram, fit on the very pixels it is
    scored on (an optimistic upper bound for any per-pixel colour threshold). It must beat
    chance (buildings do look different on average) but stay far from a segmentation.
    """
    colours, labels = [], []
    for scene in scenes:
        colours.append(scene.image.reshape(3, -1).T)
        labels.append(scene.raster()[0].reshape(-1) > 0.5)
    colours, labels = torch.cat(colours), torch.cat(labels)
    bins = 32
    q = (colours * bins).long().clamp(max=bins - 1)
    cell = (q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]
    building_count = torch.bincount(cell[labels], minlength=bins**3)
    total_count = torch.bincount(cell, minlength=bins**3)
    predicted = (2 * building_count > total_count)[cell]
    accuracy = (predicted == labels).float().mean().item()
    iou = ((predicted & labels).sum() / (predicted | labels).sum()).item()
    recall = ((predicted & labels).sum() / labels.sum()).item()
    specificity = ((~predicted & ~labels).sum() / (~labels).sum()).item()
    balanced = (recall + specificity) / 2
    print(f"building fraction {labels.float().mean():.3f}, colour-rule accuracy {accuracy:.3f}, "
          f"IoU {iou:.3f}, balanced accuracy {balanced:.3f}")
    assert balanced > 0.55  # colours differ on average ...
    assert accuracy < 0.95 and iou < 0.5  # ... but a colour threshold is no building detector
    # On average roofs are less green than what surrounds them.
    greenness = colours[:, 1] - (colours[:, 0] + colours[:, 2]) / 2
    assert greenness[~labels].mean() - greenness[labels].mean() > 0.02


def test_shadows_are_dark_and_trees_hide_roofs(scenes):
    for scene in scenes:
        brightness = scene.image.mean(0)
        fill = scene.raster()[0] > 0
        ground = ~fill & (scene.tree_mask < 0.1) & ~scene.road_mask
        shaded, lit = ground & (scene.shadow_mask > 0.8), ground & (scene.shadow_mask < 0.05)
        assert brightness[shaded].mean() < 0.8 * brightness[lit].mean()
    visibility = torch.cat([s.building_visibility for s in scenes])
    assert (visibility < 0.95).float().mean() > 0.1  # occlusion is common ...
    assert (visibility > 0.5).float().mean() > 0.8   # ... but most of each house stays visible


def test_switches():
    base = make_scene(11, trees=False, shadows=False, distractors=False)
    assert base.tree_mask.sum() == 0 and len(base.tree_radii) == 0
    assert base.shadow_mask.sum() == 0
    assert not base.paved_mask.any() and not base.shed_mask.any()
    assert torch.all(base.building_visibility == 1)
    # Layers draw from independent streams: removing trees or shadows keeps the layout.
    full, bare = make_scene(11), make_scene(11, trees=False, shadows=False)
    assert len(full.polygons) == len(bare.polygons)
    assert all(torch.equal(a, b) for a, b in zip(full.polygons, bare.polygons))
    assert full.roof_kinds == bare.roof_kinds and torch.equal(full.road_mask, bare.road_mask)
    touched = ((full.tree_mask > 0) | (full.shadow_mask > 0)).float()[None, None]
    untouched = F.max_pool2d(touched, 7, stride=1, padding=3)[0, 0] == 0  # beyond the blur's reach
    assert untouched.float().mean() > 0.3
    assert torch.equal(full.image[:, untouched], bare.image[:, untouched])
    assert len(make_scene(11, building_density=0.0).polygons) == 0
    sparse = np.mean([len(make_scene(s, building_density=0.3).polygons) for s in range(3)])
    dense = np.mean([len(make_scene(s, building_density=1.0).polygons) for s in range(3)])
    assert sparse < dense
    assert len(make_scene(11, n_roads=3).road_centrelines) == 3
    rect = make_scene(2, size=(128, 192), gsd=0.4)
    assert rect.image.shape == (3, 128, 192) and rect.raster(0.5).shape == (3, 64, 96)
    with pytest.raises(ValueError, match="building_density"):
        make_scene(0, building_density=1.5)
    with pytest.raises(ValueError, match="seed"):
        make_scene(-1)


def test_make_scenes_and_batch(scenes):
    images, rasters = scene_batch(scenes[:2], scale=0.25)
    assert images.shape == (2, 3, 256, 256) and rasters.shape == (2, 3, 64, 64)
    assert torch.equal(images[1], scenes[1].image)
    assert torch.equal(rasters[0], rasterize(scenes[0].polygons, 256, 256, scale=0.25))


def test_one_scene_is_fast():
    make_scene(0, size=64)  # warm up
    start = time.perf_counter()
    make_scene(123)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"a 256 x 256 scene took {elapsed:.2f} s (typically ~0.1 s)"


# --- load_pairs -------------------------------------------------------------------------------

def _write_png(path, height=20, width=30):
    from PIL import Image
    array = (np.random.default_rng(0).uniform(0, 1, (height, width, 3)) * 255).astype(np.uint8)
    Image.fromarray(array).save(path)
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 255)


def test_load_pairs_geojson_and_csv(tmp_path):
    pytest.importorskip("PIL")
    image_a = _write_png(tmp_path / "a.png")
    _write_png(tmp_path / "b.png")
    feature = {"type": "Feature", "properties": {},
               "geometry": {"type": "Polygon", "coordinates": [[[2, 2], [10, 2], [10, 8], [2, 8], [2, 2]]]}}
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    (tmp_path / "b.csv").write_text("polygon_id,x,y\n1,1,1\n1,5,1\n2,20,10\n1,5,5\n2,25,10\n2,25,15\n")
    pairs = load_pairs(tmp_path)
    assert [p.name for p in pairs] == ["a", "b"]
    assert torch.allclose(pairs[0].image, image_a) and pairs[0].image.shape == (3, 20, 30)
    assert torch.equal(pairs[0].polygons[0], square(2, 2, 10, 8))  # closing vertex dropped
    assert [p.shape for p in pairs[1].polygons] == [(3, 2), (3, 2)]
    assert pairs[0].raster()[0].sum() == 8 * 6


def test_load_pairs_errors(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pairs(tmp_path / "missing")
    with pytest.raises(ValueError, match="no image/polygon pairs"):
        load_pairs(tmp_path)
    _write_png(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="a.png has no polygon file"):
        load_pairs(tmp_path)
    (tmp_path / "a.csv").write_text("id,x,y\n1,1,1\n")
    with pytest.raises(ValueError, match="polygon_id,x,y"):
        load_pairs(tmp_path)
    (tmp_path / "a.csv").write_text("polygon_id,x,y\n1,100,100\n1,120,100\n1,120,120\n")
    with pytest.raises(ValueError, match="far outside"):
        load_pairs(tmp_path)
    (tmp_path / "a.csv").unlink()
    (tmp_path / "c.geojson").write_text("{}")
    with pytest.raises(FileNotFoundError, match="c.geojson has no image"):
        load_pairs(tmp_path)
