"""Synthetic aerial scenes (netsim_paper.registration.scenes).

The generator is checked against its promises: determinism, valid and disjoint footprints,
working switches, and scenes whose buildings cannot be found by colour alone.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_registration_geometry import inside_reference, segment_distance_reference

from netsim_paper.registration.geometry import rasterize
from netsim_paper.registration.scenes import AerialScene, make_scene, make_scenes, scene_batch

SCENE_SEEDS = range(6)


@pytest.fixture(scope="module")
def scenes() -> list[AerialScene]:
    return make_scenes(SCENE_SEEDS)


def test_half_scale_consistent_with_downsampling(scenes):
    for scene in scenes[:3]:
        full = scene.raster(1.0)[0]
        pooled = F.avg_pool2d(full[None, None], 2)[0, 0] > 0.5
        half = scene.raster(0.5)[0] > 0.5
        assert half.shape == (128, 128)
        iou = (pooled & half).sum() / (pooled | half).sum()
        assert iou > 0.9, iou


def test_deterministic_by_seed_and_seeds_differ(scenes):
    again = make_scene(0)
    assert torch.equal(again.image, scenes[0].image)
    assert len(again.polygons) == len(scenes[0].polygons)
    assert all(torch.equal(a, b) for a, b in zip(again.polygons, scenes[0].polygons, strict=True))
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
        return min(segment_distance_reference(x, y, b[k], b[(k + 1) % len(b)]) for x, y in a for k in range(len(b)))
    p, q = p.tolist(), q.tolist()
    return min(one_way(p, q), one_way(q, p))


def test_footprints_never_overlap(scenes):
    for scene in scenes:
        fills = torch.stack([rasterize([p], scene.height, scene.width)[0] for p in scene.polygons])
        assert fills.sum(0).max() <= 1  # no pixel in two footprints
        for i, p in enumerate(scene.polygons):
            for q in scene.polygons[i + 1:]:
                assert not any(inside_reference(x, y, q.tolist()) for x, y in p.tolist())
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
    assert all(torch.equal(a, b) for a, b in zip(full.polygons, bare.polygons, strict=True))
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
