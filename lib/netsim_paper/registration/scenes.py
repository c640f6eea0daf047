"""Synthetic suburban aerial scenes with exact building cadasters, and their rasters.

Section 1 of the paper registers aerial RGB images (Inria Aerial, ~0.3-0.5 m/px) to
misaligned OpenStreetMap building polygons. Neither data set can be reached here, so this
module draws suburban tiles whose cadaster is known exactly: the polygons are the roof
outlines that were painted into the image. A registration network trained on them has a
true answer to recover, which the real data never gives.

Polygons, cadasters, images and rasters follow `netsim_paper.registration.geometry`.

What a scene holds (drawn in this order, each step a small function below):

1. ground: lawn / dry grass / bare soil blended by multi-scale noise;
2. roads: gently curved asphalt bands (T-junctions, cul-de-sacs) with wheel tracks,
   dashed centre lines and sidewalks;
3. distractors: parking lots with stall lines and cars, driveways, unmapped garden sheds;
4. buildings along the roads, facing them: rectangles and L-shapes with 8-25 m sides,
   gable, hip or flat roofs whose planes are lit differently by the sun, ridge lines,
   varied and sometimes ground-coloured roof materials;
5. cast shadows of every raised object (ray-marched on a height map);
6. trees: textured, sun-lit crowns, many of them next to houses, hiding roof corners;
7. a global colour cast, a Gaussian blur (the sensor's PSF) and sensor noise.

The cadaster holds exactly the buildings of step 4. Shadows, driveways, sheds, trees and
cars are outside it; there is no roof overhang (the polygon *is* the roof outline seen
from above, as in a true orthophoto), and trees hide parts of it without changing it.

Example:
    >>> from netsim_paper.registration.scenes import make_scene
    >>> scene = make_scene(0)
    >>> scene.image.shape, len(scene.polygons) > 0
    (torch.Size([3, 256, 256]), True)
    >>> scene.raster(scale=0.25).shape   # geometry.rasterize of its cadaster
    torch.Size([3, 64, 64])
"""


from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from netsim_paper.registration.geometry import (
    PolygonPatch,
    distance_to_segments,
    pixel_centre_grid,
    polygon_patch,
    rasterize,
)

__all__ = ["AerialScene", "make_scene", "make_scenes", "scene_batch"]


@dataclass
class AerialScene:
    """One synthetic tile and its exact cadaster.

    Attributes:
        image: ``(3, H, W)`` float32 RGB in [0, 1].
        polygons: the cadaster: one ``(n, 2)`` float64 roof outline per building (n = 4 or 6).
        building_heights: ``(B,)`` float64 building heights in metres (they set the shadows).
        roof_kinds: B strings, "gable", "hip" or "flat".
        building_visibility: ``(B,)`` float64 fraction of each footprint's pixels that no
            tree crown hides (1 without trees).
        tree_centres: ``(T, 2)`` float64 crown centres (x, y) in pixels.
        tree_radii: ``(T,)`` float64 mean crown radii in pixels.
        tree_heights: ``(T,)`` float64 tree heights in metres.
        road_centrelines: the roads' centre polylines, ``(m, 2)`` float64 each.
        road_mask: ``(H, W)`` bool, asphalt of the roads.
        paved_mask: ``(H, W)`` bool, paved ground that is not a building and not a road:
            parking lots, driveways, sidewalks (the look-alikes of flat roofs).
        shed_mask: ``(H, W)`` bool, small garden sheds that are deliberately *not* in the
            cadaster (OpenStreetMap misses most of them too).
        tree_mask: ``(H, W)`` float32 crown opacity in [0, 1].
        shadow_mask: ``(H, W)`` float32 cast-shadow strength in [0, 1].
        sun_direction: ``(2,)`` float64 unit vector (x, y) pointing from the ground towards
            the sun, in image axes; shadows fall the opposite way.
        sun_elevation_deg: sun elevation above the horizon.
        gsd: ground sampling distance in metres per pixel.
        seed: the seed the scene was drawn with.
    """

    image: Tensor
    polygons: list[Tensor]
    building_heights: Tensor
    roof_kinds: list[str]
    building_visibility: Tensor
    tree_centres: Tensor
    tree_radii: Tensor
    tree_heights: Tensor
    road_centrelines: list[Tensor]
    road_mask: Tensor
    paved_mask: Tensor
    shed_mask: Tensor
    tree_mask: Tensor
    shadow_mask: Tensor
    sun_direction: Tensor
    sun_elevation_deg: float
    gsd: float
    seed: int

    @property
    def height(self) -> int:
        return self.image.shape[1]

    @property
    def width(self) -> int:
        return self.image.shape[2]

    def raster(self, scale: float = 1.0, **kwargs) -> Tensor:
        """`rasterize` of this scene's cadaster: ``(3, round(H * scale), round(W * scale))``."""
        return rasterize(self.polygons, self.height, self.width, scale=scale, **kwargs)


def make_scenes(seeds: Iterable[int], **kwargs) -> list[AerialScene]:
    """`make_scene` for each seed (same keyword arguments for all)."""
    return [make_scene(seed, **kwargs) for seed in seeds]


def scene_batch(scenes: Sequence[AerialScene], *, scale: float = 1.0, **raster_kwargs) -> tuple[Tensor, Tensor]:
    """Stack scenes for a network.

    Args:
        scenes: B scenes of the same size.
        scale: resolution of the rasters (the images stay at full resolution).
        raster_kwargs: passed on to `rasterize`.

    Returns:
        images ``(B, 3, H, W)`` and rasters ``(B, 3, h, w)``, float32.
    """
    if not scenes:
        raise ValueError("scene_batch needs at least one scene")
    sizes = {tuple(s.image.shape) for s in scenes}
    if len(sizes) != 1:
        raise ValueError(f"scenes have different image shapes: {sorted(sizes)}")
    images = torch.stack([s.image for s in scenes])
    rasters = torch.stack([s.raster(scale, **raster_kwargs) for s in scenes])
    return images, rasters


# =========================================================================================
# Scene generator: colours and noise
# =========================================================================================

# Display RGB colours, picked to resemble suburban orthophotos (Inria-like tones:
# desaturated greens, grey asphalt, beige concrete).
_LAWN = np.array([[0.30, 0.40, 0.21], [0.36, 0.43, 0.24], [0.27, 0.36, 0.20]])
_DRY_GRASS = np.array([[0.52, 0.50, 0.36], [0.47, 0.46, 0.32], [0.56, 0.53, 0.40]])
_BARE_SOIL = np.array([[0.55, 0.46, 0.36], [0.50, 0.43, 0.35], [0.60, 0.53, 0.43]])
_ASPHALT = np.array([[0.36, 0.36, 0.38], [0.42, 0.42, 0.43], [0.31, 0.31, 0.33]])
_CONCRETE = np.array([[0.64, 0.63, 0.60], [0.58, 0.57, 0.54], [0.70, 0.68, 0.64]])
_ROOFS = np.array([
    [0.27, 0.27, 0.29],  # dark asphalt shingle
    [0.40, 0.40, 0.41],  # grey shingle (close to asphalt roads)
    [0.45, 0.36, 0.30],  # brown shingle (close to bare soil)
    [0.58, 0.34, 0.27],  # terracotta
    [0.66, 0.65, 0.62],  # light grey / membrane (close to concrete)
    [0.58, 0.54, 0.45],  # tan (close to dry grass)
    [0.35, 0.39, 0.36],  # green-grey metal (close to lawn in shade)
    [0.50, 0.48, 0.47],  # weathered grey
])
_ROOF_PROBABILITIES = np.array([0.2, 0.16, 0.16, 0.1, 0.12, 0.1, 0.06, 0.1])
_CAR_COLOURS = np.array([[0.85, 0.85, 0.85], [0.12, 0.12, 0.13], [0.6, 0.6, 0.62], [0.55, 0.12, 0.1],
                         [0.15, 0.22, 0.45], [0.75, 0.75, 0.72]])


def _pick(rng: np.random.Generator, palette: np.ndarray, jitter: float = 0.04) -> np.ndarray:
    """A palette row, with brightness jitter and a much smaller hue jitter (greys stay grey)."""
    colour = palette[rng.integers(len(palette))]
    return np.clip(colour * rng.uniform(1 - jitter, 1 + jitter) + rng.normal(0, jitter / 8, 3), 0.02, 0.98)


def _rgb(colour: np.ndarray) -> Tensor:
    """(3,) colour -> (3, 1, 1) float32 tensor for broadcasting against images."""
    return torch.as_tensor(colour, dtype=torch.float32).view(3, 1, 1)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> Tensor:
    """Zero-mean, unit-variance (H, W) float32 noise correlated over ~`cell` pixels.

    A coarse Gaussian grid upsampled bicubically: cheap value noise, enough for textures.
    """
    if cell <= 1:
        return torch.from_numpy(rng.standard_normal((height, width)).astype(np.float32))
    gh, gw = int(math.ceil(height / cell)) + 3, int(math.ceil(width / cell)) + 3
    grid = torch.from_numpy(rng.standard_normal((1, 1, gh, gw)).astype(np.float32))
    up = F.interpolate(grid, scale_factor=float(cell), mode="bicubic", align_corners=False)[0, 0]
    oy, ox = rng.integers(0, int(cell), size=2)  # random phase, so cell borders do not line up
    field_ = up[oy:oy + height, ox:ox + width]
    return (field_ - field_.mean()) / field_.std().clamp_min(1e-6)


def _fractal_noise(rng: np.random.Generator, height: int, width: int, cells: Sequence[float],
                   roughness: float = 0.6) -> Tensor:
    """Sum of `_smooth_noise` octaves; coarser cells weigh more (by cell**roughness); unit std."""
    weights = np.array(cells, dtype=float) ** roughness
    total = sum(w * _smooth_noise(rng, height, width, c) for w, c in zip(weights, cells, strict=True))
    return total / total.std().clamp_min(1e-6)


def _gaussian_blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a (C, H, W) image with reflected borders."""
    if sigma <= 0:
        return image
    radius = max(int(math.ceil(3 * sigma)), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image.unsqueeze(0), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


def _composite(image: Tensor, rows: slice, cols: slice, colour: Tensor, alpha: Tensor) -> None:
    """In place: image[:, rows, cols] = (1 - alpha) * image + alpha * colour."""
    region = image[:, rows, cols]
    region.mul_(1 - alpha).add_(colour * alpha)


# =========================================================================================
# Scene generator: geometry helpers
# =========================================================================================

@dataclass
class _Road:
    """A road: its centreline (m, 2) in pixels, arc lengths (m,) and half width in pixels."""

    points: np.ndarray
    half_width: float
    dead_end: bool

    def __post_init__(self):
        steps = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        self.arclength = np.concatenate([[0.0], np.cumsum(steps)])

    def frame(self, s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Point, unit tangent and unit left normal at arc length s."""
        i = int(np.clip(np.searchsorted(self.arclength, s) - 1, 0, len(self.points) - 2))
        a, b = self.points[i], self.points[i + 1]
        tangent = (b - a) / max(np.linalg.norm(b - a), 1e-9)
        t = (s - self.arclength[i]) / max(self.arclength[i + 1] - self.arclength[i], 1e-9)
        return a + t * (b - a), tangent, np.array([-tangent[1], tangent[0]])


def _rotation(angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit axes (u, v) of a frame rotated by `angle` radians (v = u turned +90 degrees)."""
    u = np.array([math.cos(angle), math.sin(angle)])
    return u, np.array([-u[1], u[0]])


@dataclass
class _Wing:
    """A rectangular part of a building: local box [0, length_u] x [0, length_v] on axes u, v."""

    origin: np.ndarray
    u_axis: np.ndarray
    v_axis: np.ndarray
    length_u: float
    length_v: float


@dataclass
class _Building:
    """A placed house: its footprint, roof parts and the road-facing frame it was built in."""

    polygon: np.ndarray   # (n, 2)
    wings: list[_Wing]
    height_m: float
    roof_kind: str
    front_centre: np.ndarray  # middle of the road-facing side (v = 0)
    u_axis: np.ndarray        # along the road
    v_axis: np.ndarray        # away from the road
    width: float              # extent along u, pixels
    row: int                  # 0: faces the road; 1: behind row 0


def _house_shape(rng: np.random.Generator, width: float, depth: float, l_shape: bool):
    """Footprint and wings in a local frame: u along the road in [-width/2, width/2], v away from it in [0, depth].

    Returns:
        vertices (n, 2) local (u, v) and a list of wing boxes (u0, v0, u1, v1).
    """
    half = width / 2
    if not l_shape:
        return np.array([[-half, 0], [half, 0], [half, depth], [-half, depth]]), [(-half, 0.0, half, depth)]
    notch_u = rng.uniform(0.35, 0.6) * width
    notch_v = rng.uniform(0.35, 0.6) * depth
    vertices = np.array([[-half, 0], [half, 0], [half, depth - notch_v], [half - notch_u, depth - notch_v],
                         [half - notch_u, depth], [-half, depth]])
    wings = [(-half, 0.0, half - notch_u, depth), (half - notch_u, 0.0, half, depth - notch_v)]
    if rng.random() < 0.5:  # notch on the left instead of the right
        vertices = vertices * [-1, 1]
        wings = [(-u1, v0, -u0, v1) for u0, v0, u1, v1 in wings]
    if rng.random() < 0.3:  # notch at the front (an L opening towards the road)
        vertices = vertices * [1, -1] + [0, depth]
        wings = [(u0, depth - v1, u1, depth - v0) for u0, v0, u1, v1 in wings]
    return vertices, wings


def _to_world(local: np.ndarray, origin: np.ndarray, u_axis: np.ndarray, v_axis: np.ndarray) -> np.ndarray:
    """Local (u, v) rows -> world (x, y) rows."""
    return origin + local[:, :1] * u_axis + local[:, 1:] * v_axis


def _oriented_rectangle(centre: np.ndarray, u_axis: np.ndarray, v_axis: np.ndarray, length_u: float,
                        length_v: float) -> np.ndarray:
    """(4, 2) corners of a rectangle centred on `centre` with sides along the axes."""
    local = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [length_u / 2, length_v / 2]
    return _to_world(local, centre, u_axis, v_axis)


# =========================================================================================
# Scene generator: the layers
# =========================================================================================

_STREAMS = ("sun", "ground", "roads", "road_texture", "parking_lots", "buildings", "driveways", "sheds", "roofs",
            "trees", "tree_shapes", "tree_texture", "sensor")


class _SceneBuilder:
    """Draws one scene layer by layer; holds the RNG, the canvas and what was placed."""

    def __init__(self, seed: int, height: int, width: int, gsd: float):
        # One independent stream per layer, so that switching a layer off (trees=False,
        # shadows=False) leaves every other layer of the scene exactly as it was.
        children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
        self._streams = {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children, strict=True)}
        self.height, self.width, self.gsd = height, width, gsd
        self.image = torch.zeros(3, height, width)
        self.height_map = torch.zeros(height, width)  # metres above ground
        self.occupied = torch.zeros(height, width, dtype=torch.bool)  # no new structure may touch these
        self.road_mask = torch.zeros(height, width, dtype=torch.bool)
        self.paved_mask = torch.zeros(height, width, dtype=torch.bool)
        self.shed_mask = torch.zeros(height, width, dtype=torch.bool)
        self.tree_mask = torch.zeros(height, width)
        self.shadow_mask = torch.zeros(height, width)
        self.roads: list[_Road] = []
        self.buildings: list[_Building] = []
        self.trees: list[tuple[np.ndarray, float, float]] = []  # centre, radius px, height m
        self._tree_patches: list[tuple] = []  # per tree: rows, cols, opacity, dx / r, dy / r
        px, py = pixel_centre_grid(0, height, 0, width)
        self.px, self.py = px.float(), py.float()

    def stream(self, layer: str) -> np.random.Generator:
        """The random generator of one layer (see `_STREAMS`)."""
        return self._streams[layer]

    def metres(self, m: float) -> float:
        """A ground length in metres, in pixels."""
        return m / self.gsd

    # --- ground ------------------------------------------------------------------------

    def draw_ground(self, distractors: bool) -> None:
        """Lawn blended with dry grass and bare-soil patches, textured at several scales."""
        h, w, rng = self.height, self.width, self.stream("ground")
        lawn, dry, soil = _rgb(_pick(rng, _LAWN)), _rgb(_pick(rng, _DRY_GRASS)), _rgb(_pick(rng, _BARE_SOIL))
        dryness = rng.uniform(-0.8, 0.8)  # some scenes are lush, some parched
        blend = torch.sigmoid(1.6 * _fractal_noise(rng, h, w, (96, 48, 24)) + 2 * dryness)
        ground = lawn * (1 - blend) + dry * blend
        if distractors:  # sharp-edged bare-soil patches: roof-coloured but no roof
            patches = _fractal_noise(rng, h, w, (40, 20, 10))
            soil_alpha = torch.sigmoid(4 * (patches - rng.uniform(1.2, 2.0)))
            ground = ground * (1 - soil_alpha) + soil * soil_alpha
        texture = 0.07 * _fractal_noise(rng, h, w, (12, 6, 3)) + 0.05 * _smooth_noise(rng, h, w, 1)
        self.image = (ground * (1 + texture)).float()

    # --- roads ---------------------------------------------------------------------------

    def _centreline(self, start: np.ndarray, angle: float, length: float, bend: float) -> np.ndarray:
        """(33, 2) points of a gently curved line: straight plus a quadratic sideways bend."""
        u, v = _rotation(angle)
        s = np.linspace(0.0, length, 33)
        sideways = bend * (s / length) ** 2
        return start + s[:, None] * u + sideways[:, None] * v

    def plan_roads(self, n_roads: int | None) -> None:
        """1-3 roads: a through road, then roads branching off it (T-junctions), some ending in a cul-de-sac."""
        rng, h, w = self.stream("roads"), self.height, self.width
        n = int(rng.choice([1, 2, 2, 3])) if n_roads is None else n_roads
        diagonal = math.hypot(h, w)
        base_angle = rng.uniform(0, math.pi)
        for k in range(n):
            half_width = self.metres(rng.uniform(3.5, 5.0))
            bend = rng.uniform(-0.12, 0.12) * diagonal
            if k == 0:  # through road across the tile
                centre = np.array([w, h]) * rng.uniform(0.3, 0.7, size=2)
                u, _ = _rotation(base_angle)
                points = self._centreline(centre - diagonal * u, base_angle, 2 * diagonal, bend)
                self.roads.append(_Road(points, half_width, dead_end=False))
                continue
            # Later roads branch off an earlier one, roughly at right angles (suburban grid).
            parent = self.roads[int(rng.integers(len(self.roads)))]
            s0 = rng.uniform(0.35, 0.65) * parent.arclength[-1]
            start, tangent, normal = parent.frame(s0)
            side = rng.choice([-1.0, 1.0])
            angle = math.atan2(side * normal[1], side * normal[0]) + rng.normal(0, 0.12)
            dead_end = rng.random() < 0.35
            length = rng.uniform(0.3, 0.5) * diagonal if dead_end else diagonal
            points = self._centreline(start, angle, length, bend * 0.5)
            self.roads.append(_Road(points, half_width, dead_end=dead_end))

    def draw_roads(self, distractors: bool) -> None:
        """Asphalt bands with wheel tracks, dashed centre lines, kerbs and optional sidewalks."""
        rng = self.stream("road_texture")
        asphalt = _rgb(_pick(rng, _ASPHALT, 0.06))
        concrete = _rgb(_pick(rng, _CONCRETE))
        with_sidewalk = distractors and rng.random() < 0.6
        with_centre_line = rng.random() < 0.5
        grain = 0.05 * _smooth_noise(rng, self.height, self.width, 1) + 0.06 * _fractal_noise(
            rng, self.height, self.width, (32, 8))
        road_alpha = torch.zeros(self.height, self.width)
        sidewalk_alpha = torch.zeros(self.height, self.width)
        marking_alpha = torch.zeros(self.height, self.width)
        track_shade = torch.zeros(self.height, self.width)
        for road in self.roads:
            reach = road.half_width + self.metres(4.0)  # road, kerb and sidewalk
            distance, along, offset = self._nearest_on_polyline(road.points, reach)
            if road.dead_end:  # turning circle at the end of a cul-de-sac
                end = torch.as_tensor(road.points[-1], dtype=torch.float32)
                bulb = torch.hypot(self.px - end[0], self.py - end[1]) - 0.8 * road.half_width
                distance = torch.minimum(distance, bulb.clamp_min(0))
            road_alpha = torch.maximum(road_alpha, (road.half_width + 0.5 - distance).clamp(0, 1))
            tracks = torch.exp(-0.5 * ((offset.abs() - road.half_width * 0.5) / 1.2) ** 2)
            track_shade = torch.maximum(track_shade, tracks * (distance < road.half_width).float())
            if with_centre_line:
                dashes = ((along / self.metres(3.0)) % 3.0 < 1.0).float()  # 3 m dash, 6 m gap
                marking_alpha = torch.maximum(marking_alpha, 0.55 * dashes * (0.75 - offset.abs()).clamp(0, 1)
                                              * (distance < road.half_width).float())
            if with_sidewalk:
                inner = road.half_width + self.metres(1.5)
                band = ((distance - inner) * ((inner + self.metres(1.8)) - distance) >= 0).float()
                sidewalk_alpha = torch.maximum(sidewalk_alpha, band)
        sidewalk_alpha = sidewalk_alpha * (1 - road_alpha)
        _composite(self.image, slice(None), slice(None), concrete * (1 + 0.5 * grain), sidewalk_alpha)
        road_colour = asphalt * (1 + grain) * (1 - 0.08 * track_shade)
        _composite(self.image, slice(None), slice(None), road_colour, road_alpha)
        _composite(self.image, slice(None), slice(None), _rgb(np.array([0.8, 0.78, 0.7])), marking_alpha)
        self.road_mask = road_alpha > 0.5
        self.paved_mask |= sidewalk_alpha > 0.5
        self.occupied |= self.road_mask | (sidewalk_alpha > 0)

    def _nearest_on_polyline(self, points: np.ndarray, reach: float) -> tuple[Tensor, Tensor, Tensor]:
        """Distance to a polyline, and arc length and signed offset of the nearest point, per pixel.

        Only pixels within `reach` of the line are computed exactly (they are all a road
        needs); the others get distance = inf, arc length and offset 0. A coarse pass on
        4 x 4 blocks finds them: a pixel centre lies within 2 * sqrt(2) of its block's centre
        and distance is 1-Lipschitz, so no pixel within reach is missed.

        Args:
            points: (m, 2) centreline vertices.
            reach: pixels further than this may be skipped.

        Returns:
            distance, along, offset: (H, W) float32 each.
        """
        h, w = self.height, self.width
        pts = torch.as_tensor(points, dtype=torch.float32)
        a, b = pts[:-1], pts[1:]
        near_tile = ((torch.minimum(a, b) <= torch.tensor([w + reach, h + reach])).all(1)
                     & (torch.maximum(a, b) >= -reach).all(1))
        keep = near_tile.nonzero()[:, 0]
        distance = torch.full((h, w), math.inf)
        along, offset = torch.zeros(h, w), torch.zeros(h, w)
        if len(keep) == 0:
            return distance, along, offset
        cumulative = torch.cat([torch.zeros(1), (b - a).norm(dim=1).cumsum(0)[:-1]])
        a, b, cumulative = a[keep], b[keep], cumulative[keep]
        block_x = torch.arange(0, w, 4, dtype=torch.float32) + 2
        block_y = torch.arange(0, h, 4, dtype=torch.float32) + 2
        bx, by = torch.meshgrid(block_x, block_y, indexing="xy")
        coarse = distance_to_segments(bx, by, a, b) <= reach + 2 * math.sqrt(2)
        candidates = coarse.repeat_interleave(4, 0).repeat_interleave(4, 1)[:h, :w]
        rows, cols = candidates.nonzero(as_tuple=True)
        qx, qy = self.px[rows, cols], self.py[rows, cols]
        d = b - a
        length = d.norm(dim=1).clamp_min(1e-6)
        rx, ry = qx.unsqueeze(-1) - a[:, 0], qy.unsqueeze(-1) - a[:, 1]
        t = ((rx * d[:, 0] + ry * d[:, 1]) / length**2).clamp(0, 1)
        nearest_distance, nearest = torch.hypot(rx - t * d[:, 0], ry - t * d[:, 1]).min(-1)
        pick = nearest.unsqueeze(-1)
        cross = (d[:, 0] * ry - d[:, 1] * rx) / length  # signed distance to the segment's line
        distance[rows, cols] = nearest_distance
        along[rows, cols] = cumulative[nearest] + t.gather(-1, pick)[:, 0] * length[nearest]
        offset[rows, cols] = cross.gather(-1, pick)[:, 0]
        return distance, along, offset

    # --- placement ------------------------------------------------------------------------

    def _fits(self, polygon: np.ndarray, clearance_px: float, margin_px: float = 2.0) -> bool:
        """Whether a polygon lies inside the tile and `clearance_px` away from everything occupied."""
        if (polygon.min() < margin_px or (polygon[:, 0] > self.width - margin_px).any()
                or (polygon[:, 1] > self.height - margin_px).any()):
            return False
        patch = polygon_patch(torch.from_numpy(polygon), self.height, self.width, pad=clearance_px + 1)
        rows, cols = patch.slices()
        grown = patch.inside | (patch.boundary_distance <= clearance_px)
        return not bool((grown & self.occupied[rows, cols]).any())

    def _occupy(self, polygon: np.ndarray) -> PolygonPatch:
        patch = polygon_patch(torch.from_numpy(polygon), self.height, self.width)
        rows, cols = patch.slices()
        self.occupied[rows, cols] |= patch.inside | (patch.boundary_distance <= 0.5)
        return patch

    def place_parking_lots(self) -> None:
        """0-2 paved lots beside roads, with stall lines and parked cars (not buildings)."""
        rng = self.stream("parking_lots")
        wanted, placed = int(rng.choice([0, 1, 1, 2])), 0
        for _ in range(6 * wanted):  # a few tries per lot: many spots spill off the tile
            if placed == wanted:
                break
            road = self.roads[int(rng.integers(len(self.roads)))]
            s = rng.uniform(0.1, 0.9) * road.arclength[-1]
            point, tangent, normal = road.frame(s)
            side = rng.choice([-1.0, 1.0])
            along, across = self.metres(rng.uniform(18, 40)), self.metres(rng.uniform(12, 22))
            centre = point + side * normal * (road.half_width + self.metres(rng.uniform(4.5, 6)) + across / 2)
            u_axis, v_axis = tangent, side * normal
            polygon = _oriented_rectangle(centre, u_axis, v_axis, along, across)
            if not self._fits(polygon, clearance_px=1.0):
                continue
            placed += 1
            patch = self._occupy(polygon)
            rows, cols = patch.slices()
            alpha = patch.coverage().float()
            surface = _rgb(_pick(rng, np.vstack([_ASPHALT, _CONCRETE]), 0.05))
            du = (patch.px - centre[0]) * u_axis[0] + (patch.py - centre[1]) * u_axis[1]
            dv = (patch.px - centre[0]) * v_axis[0] + (patch.py - centre[1]) * v_axis[1]
            stall = self.metres(2.6)
            from_edge = across / 2 - dv.abs().float()  # distance to the lot's long sides
            in_stall_rows = (from_edge > self.metres(0.3)) & (from_edge < self.metres(5.0))  # 5 m deep stalls
            lines = (((du.float() + along / 2) / stall) % 1.0 < 0.15) & in_stall_rows
            colour = surface * (1 + 0.04 * _smooth_noise(rng, *alpha.shape, 1))
            paint = _rgb(np.array([0.85, 0.84, 0.8]))
            colour = torch.where(lines, 0.3 * colour + 0.7 * paint, colour)
            _composite(self.image, rows, cols, colour, alpha)
            self.paved_mask[rows, cols] |= patch.inside
            self._park_cars(rng, centre, u_axis, v_axis, along, across, stall)

    def _park_cars(self, rng: np.random.Generator, centre, u_axis, v_axis, along, across, stall) -> None:
        """Cars in about half the stalls of a lot's two rows."""
        n_stalls = int(along // stall)
        for row in (-1, 1):
            for k in range(n_stalls):
                if rng.random() < 0.5:
                    continue
                offset_u = -along / 2 + (k + 0.5) * stall
                offset_v = row * (across / 2 - self.metres(2.6))
                car_centre = centre + offset_u * u_axis + offset_v * v_axis
                self._draw_car(rng, car_centre, v_axis, u_axis)

    def _draw_car(self, rng: np.random.Generator, centre: np.ndarray, long_axis: np.ndarray,
                  short_axis: np.ndarray) -> None:
        """A 4.5 x 1.8 m car: body colour, darker windscreen band, 1.5 m tall (casts a shadow)."""
        polygon = _oriented_rectangle(centre, long_axis, short_axis, self.metres(4.5), self.metres(1.8))
        patch = polygon_patch(torch.from_numpy(polygon), self.height, self.width)
        if patch is None:
            return
        rows, cols = patch.slices()
        along = ((patch.px - centre[0]) * long_axis[0] + (patch.py - centre[1]) * long_axis[1]).float()
        body = _rgb(_pick(rng, _CAR_COLOURS, 0.05))
        glass = ((along.abs() - self.metres(0.9)).abs() < self.metres(0.45)).float()
        colour = body * (1 - 0.6 * glass)
        alpha = patch.coverage().float()
        _composite(self.image, rows, cols, colour, alpha)
        self.height_map[rows, cols] = torch.maximum(self.height_map[rows, cols], 1.5 * (alpha > 0.5).float())

    def place_buildings(self, density: float) -> None:
        """Houses in two rows on each side of every road, with gaps; rejected where they would touch anything.

        Row 0 faces the road (4-10 m front yard); row 1 stands behind it, back garden to
        back garden, as if facing a road beyond the tile. Each free slot is built with
        probability `density`.
        """
        rng = self.stream("buildings")
        clearance = self.metres(1.5)
        for road in self.roads:
            for side in (-1.0, 1.0):
                for row in (0, 1):
                    s = rng.uniform(0, self.metres(10))
                    while s < road.arclength[-1]:
                        width = self.metres(float(np.clip(rng.normal(18, 4), 8, 25)))
                        depth = self.metres(float(np.clip(rng.normal(15, 3.5), 8, 25)))
                        if rng.random() > density:
                            s += width + self.metres(rng.uniform(2, 6))
                            continue
                        building = self._propose_house(rng, road, s + width / 2, side, row, width, depth)
                        if self._fits(building.polygon, clearance):
                            self._occupy(building.polygon)
                            self.buildings.append(building)
                            s += width + self.metres(rng.uniform(2.5, 9))
                        else:
                            s += self.metres(rng.uniform(3, 8))

    def _propose_house(self, rng: np.random.Generator, road: _Road, s: float, side: float, row: int, width: float,
                       depth: float) -> _Building:
        """A house whose front edge is parallel to the road at arc length s (+- 3 degrees)."""
        point, tangent, normal = road.frame(s)
        angle = math.atan2(tangent[1], tangent[0]) + rng.normal(0, math.radians(3))
        u_axis, v_axis = _rotation(angle)
        if np.dot(v_axis, side * normal) < 0:
            v_axis = -v_axis  # v points away from the road
        setback = road.half_width + self.metres(rng.uniform(4, 10) if row == 0 else rng.uniform(36, 46))
        front_centre = point + side * normal * setback
        vertices, wings = _house_shape(rng, width, depth, l_shape=rng.random() < 0.35)
        polygon = _to_world(vertices, front_centre, u_axis, v_axis)
        wing_frames = [_Wing(_to_world(np.array([[u0, v0]]), front_centre, u_axis, v_axis)[0], u_axis, v_axis,
                             u1 - u0, v1 - v0) for u0, v0, u1, v1 in wings]
        roof_kind = str(rng.choice(["gable", "hip", "flat"], p=[0.5, 0.32, 0.18]))
        height_m = rng.uniform(3.0, 5.0) if roof_kind == "flat" else rng.uniform(5.0, 9.0)
        return _Building(polygon, wing_frames, height_m, roof_kind, front_centre, u_axis, v_axis, width, row)

    def place_driveways(self, probability: float = 0.7) -> None:
        """Paved strips from a front-row house to the road (drawn under the roofs)."""
        rng = self.stream("driveways")
        concrete = _pick(rng, _CONCRETE)
        for building in self.buildings:
            if building.row != 0 or rng.random() > probability:
                continue
            u_axis, v_axis = building.u_axis, building.v_axis
            start = building.front_centre + u_axis * rng.uniform(-0.3, 0.3) * building.width
            reach = self._distance_to_road(start, -v_axis)
            if reach is None:
                continue
            centre = start - v_axis * reach / 2
            polygon = _oriented_rectangle(centre, u_axis, v_axis, self.metres(rng.uniform(3, 5)), reach + 1)
            patch = polygon_patch(torch.from_numpy(polygon), self.height, self.width)
            if patch is None:
                continue
            rows, cols = patch.slices()
            alpha = patch.coverage().float() * (~self.road_mask[rows, cols]).float()
            colour = _rgb(concrete) * (1 + 0.05 * _smooth_noise(rng, *alpha.shape, 1))
            _composite(self.image, rows, cols, colour, alpha)
            self.paved_mask[rows, cols] |= (alpha > 0.5)
            if rng.random() < 0.4:
                self._draw_car(rng, centre, v_axis, u_axis)

    def _distance_to_road(self, start: np.ndarray, direction: np.ndarray, max_px: float = 80) -> float | None:
        """Pixels from `start` along `direction` to the first road pixel, or None."""
        for step in np.arange(1.0, max_px, 1.0):
            x, y = start + step * direction
            if not (0 <= x < self.width and 0 <= y < self.height):
                return None
            if self.road_mask[int(y), int(x)]:
                return float(step)
        return None

    def place_sheds(self) -> None:
        """0-3 garden sheds behind houses: small roofs that are NOT in the cadaster (as often in OSM)."""
        rng = self.stream("sheds")
        for _ in range(int(rng.integers(0, 4))):
            if not self.buildings:
                return
            house = self.buildings[int(rng.integers(len(self.buildings)))]
            wing = house.wings[0]
            behind = wing.origin + wing.v_axis * (wing.length_v + self.metres(rng.uniform(3, 8))) \
                + wing.u_axis * rng.uniform(0, wing.length_u)
            polygon = _oriented_rectangle(behind, wing.u_axis, wing.v_axis, self.metres(rng.uniform(2.5, 4.5)),
                                          self.metres(rng.uniform(2.5, 4)))
            if not self._fits(polygon, clearance_px=self.metres(1.0)):
                continue
            patch = self._occupy(polygon)
            rows, cols = patch.slices()
            alpha = patch.coverage().float()
            _composite(self.image, rows, cols, _rgb(_pick(rng, _ROOFS, 0.08)), alpha)
            self.shed_mask[rows, cols] |= patch.inside
            self.height_map[rows, cols] = torch.maximum(self.height_map[rows, cols], 2.5 * patch.inside.float())

    # --- roofs ------------------------------------------------------------------------------

    def draw_roofs(self, sun: np.ndarray) -> None:
        """Each footprint filled with its roof: per-plane sun shading, ridge/hip lines, material texture."""
        rng = self.stream("roofs")
        ground_mean = self.image.mean((1, 2)).numpy()
        for building in self.buildings:
            if rng.random() < 0.15:  # low contrast: roof colour near the ground's, a little brighter or darker
                brightness = rng.choice([-1, 1]) * rng.uniform(0.08, 0.2)
                base = np.clip(ground_mean * (1 + brightness) + rng.normal(0, 0.01, 3), 0.05, 0.95)
            else:
                base = _ROOFS[rng.choice(len(_ROOFS), p=_ROOF_PROBABILITIES)] * rng.uniform(0.92, 1.08)
            patch = polygon_patch(torch.from_numpy(building.polygon), self.height, self.width)
            rows, cols = patch.slices()
            shade = self._roof_shading(building, patch, sun, contrast=rng.uniform(0.06, 0.3))
            texture = 0.04 * _smooth_noise(rng, *shade.shape, 1) + 0.04 * _smooth_noise(rng, *shade.shape, 6)
            colour = _rgb(np.clip(base, 0, 1)) * shade * (1 + texture)
            alpha = patch.coverage().float()
            _composite(self.image, rows, cols, colour, alpha)
            self.height_map[rows, cols] = torch.maximum(self.height_map[rows, cols],
                                                        building.height_m * (alpha > 0.5).float())

    def _roof_shading(self, building: _Building, patch: PolygonPatch, sun: np.ndarray, contrast: float) -> Tensor:
        """(hc, wc) brightness factor of a roof.

        Every pixel belongs to the wing it lies deepest in. Within a wing, a hip roof's plane
        is the one of the nearest side (the straight skeleton of a rectangle), a gable's the
        nearest long side; the plane slopes down towards that side, so its brightness is
        1 + contrast * (outward normal . sun). Ridges and hips, where two planes meet, get a
        thin line. Flat roofs get a parapet rim instead.
        """
        px, py = patch.px.float(), patch.py.float()
        best_depth = torch.full_like(px, -math.inf)
        shade = torch.ones_like(px)
        for wing in building.wings:
            u = (px - wing.origin[0]) * wing.u_axis[0] + (py - wing.origin[1]) * wing.u_axis[1]
            v = (px - wing.origin[0]) * wing.v_axis[0] + (py - wing.origin[1]) * wing.v_axis[1]
            to_side = torch.stack([u, wing.length_u - u, v, wing.length_v - v])  # (4, hc, wc)
            depth = to_side.amin(0)
            normals = np.stack([-wing.u_axis, wing.u_axis, -wing.v_axis, wing.v_axis])  # outward, per side
            lit = torch.as_tensor(normals @ sun, dtype=torch.float32)
            wing_shade = self._wing_shading(building.roof_kind, wing, to_side, lit, contrast)
            mine = depth > best_depth
            shade = torch.where(mine, wing_shade, shade)
            best_depth = torch.maximum(best_depth, depth)
        return shade

    def _wing_shading(self, roof_kind: str, wing: _Wing, to_side: Tensor, lit: Tensor, contrast: float) -> Tensor:
        """(hc, wc) brightness of one wing; `to_side` (4, hc, wc) distances to its sides, `lit` (4,) normal . sun."""
        if roof_kind == "flat":
            rim = (to_side.amin(0) < 1.0).float()
            return 1 + 0.12 * rim
        sides = [0, 1, 2, 3] if roof_kind == "hip" else ([2, 3] if wing.length_u >= wing.length_v else [0, 1])
        distances = to_side[sides]
        ordered, nearest = distances.sort(0)
        shade = 1 + contrast * lit[sides][nearest[0]]
        ridge = (ordered[1] - ordered[0]) < 0.8  # where two planes meet
        return torch.where(ridge, shade * (1 + 0.6 * contrast), shade)

    # --- shadows and trees ---------------------------------------------------------------------

    def plant_trees(self, density_per_ha: float) -> None:
        """Trees next to houses (hiding corners and edges), on road verges, and scattered at random."""
        rng = self.stream("trees")
        area_ha = self.height * self.width * self.gsd**2 / 1e4
        n = int(rng.poisson(density_per_ha * area_ha))
        for _ in range(n):
            radius = self.metres(rng.uniform(2.0, 6.0))
            kind = rng.random()
            if kind < 0.45 and self.buildings:  # in a yard, overlapping a house corner or side
                house = self.buildings[int(rng.integers(len(self.buildings)))]
                corner = house.polygon[int(rng.integers(len(house.polygon)))]
                centre = corner + rng.normal(0, radius * 0.8, 2)
            elif kind < 0.7 and self.roads:  # street tree on the verge
                road = self.roads[int(rng.integers(len(self.roads)))]
                point, _, normal = road.frame(rng.uniform(0, road.arclength[-1]))
                centre = point + rng.choice([-1, 1]) * normal * (road.half_width + radius * rng.uniform(0.6, 1.3))
            else:
                centre = rng.uniform([0, 0], [self.width, self.height])
            if not (0 <= centre[0] < self.width and 0 <= centre[1] < self.height):
                continue
            if self.road_mask[int(centre[1]), int(centre[0])]:
                continue
            self.trees.append((centre, radius, rng.uniform(5, 12)))

    def _tree_alpha(self, centre: np.ndarray, radius: float):
        """Crown opacity on the box around it: a disc with a lobed, noisy outline."""
        rng = self.stream("tree_shapes")
        reach = radius * 1.4
        y0, y1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 1, self.height)
        x0, x1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 1, self.width)
        px, py = self.px[y0:y1, x0:x1], self.py[y0:y1, x0:x1]
        dx, dy = px - float(centre[0]), py - float(centre[1])
        distance, angle = torch.hypot(dx, dy), torch.atan2(dy, dx)
        outline = torch.ones_like(angle)
        for lobes in (3, 5, 7):
            outline = outline + rng.uniform(0.03, 0.1) * torch.sin(lobes * angle + rng.uniform(0, 2 * math.pi))
        alpha = (radius * outline - distance + 0.5).clamp(0, 1)
        return slice(y0, y1), slice(x0, x1), alpha, dx / radius, dy / radius, distance / radius

    def add_tree_heights(self) -> None:
        """Crowns into the height map (a dome), so they cast shadows."""
        self._tree_patches = []
        for centre, radius, height_m in self.trees:
            rows, cols, alpha, dx, dy, r = self._tree_alpha(centre, radius)
            dome = height_m * (0.3 + 0.7 * (1 - r.clamp(max=1) ** 2).sqrt())
            self.height_map[rows, cols] = torch.maximum(self.height_map[rows, cols], dome * (alpha > 0.5).float())
            self._tree_patches.append((rows, cols, alpha, dx, dy))

    def cast_shadows(self, sun: np.ndarray, elevation: float, strength: float) -> None:
        """Darken every pixel that a taller object hides from the sun.

        Ray-marching on the height map: pixel p is shaded when, at horizontal distance s
        towards the sun, some point q is higher than p by at least s * tan(elevation).
        Integer steps (1 px) suffice at this resolution; the mask is then softened by the
        penumbra (a 0.8 px blur).
        """
        height_px = self.height_map / self.gsd
        cot = 1.0 / math.tan(elevation)
        max_reach = float(height_px.max()) * cot
        shadow = torch.zeros_like(height_px, dtype=torch.bool)
        seen = set()
        for step in range(1, int(math.ceil(max_reach)) + 1):
            dx, dy = int(round(step * sun[0])), int(round(step * sun[1]))
            if (dx, dy) in seen:
                continue
            seen.add((dx, dy))
            shifted = _shift(height_px, dx, dy)
            shadow |= (shifted - height_px) * cot >= math.hypot(dx, dy)
        soft = _gaussian_blur(shadow.float().unsqueeze(0), 0.8)[0]
        self.shadow_mask = soft
        tint = torch.tensor([0.62, 0.6, 0.5]).view(3, 1, 1)  # shadows are bluish: lit by the sky only
        self.image = self.image * (1 - strength * tint * soft)

    def draw_trees(self, sun: np.ndarray) -> None:
        """Crowns on top of everything: clumpy foliage texture, lit on the sun side, dark rim."""
        rng = self.stream("tree_texture")
        for rows, cols, alpha, dx, dy in self._tree_patches:
            leaf = np.array([rng.uniform(0.14, 0.24), rng.uniform(0.22, 0.32), rng.uniform(0.10, 0.17)])
            if rng.random() < 0.2:  # an autumn / dry crown
                leaf = leaf * [1.7, 1.3, 1.1]
            h, w = alpha.shape
            clumps = 0.22 * _smooth_noise(rng, h, w, 2.5) + 0.1 * _smooth_noise(rng, h, w, 1)
            sunlit = dx * float(sun[0]) + dy * float(sun[1])  # -1 (away) .. 1 (towards the sun)
            shade = (1 + 0.35 * sunlit.clamp(-1, 1)) * (1 + clumps)
            _composite(self.image, rows, cols, _rgb(leaf) * shade, alpha)
            self.tree_mask[rows, cols] = torch.maximum(self.tree_mask[rows, cols], alpha)

    # --- sensor -------------------------------------------------------------------------------

    def finish(self, blur_sigma: float, noise_std: float) -> Tensor:
        """Colour cast, point-spread blur, sensor noise, clipping to [0, 1]."""
        rng = self.stream("sensor")
        cast = _rgb(1 + rng.normal(0, 0.015, 3)) * rng.uniform(0.9, 1.12)
        image = _gaussian_blur(self.image * cast, blur_sigma)
        image = image + noise_std * torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
        return image.clamp(0, 1).contiguous()


def _shift(field_: Tensor, dx: int, dy: int) -> Tensor:
    """out[y, x] = field[y + dy, x + dx], zero where that falls off the tile."""
    h, w = field_.shape
    out = torch.zeros_like(field_)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    ys_dst = slice(max(-dy, 0), h - max(dy, 0))
    xs_dst = slice(max(-dx, 0), w - max(dx, 0))
    ys_src = slice(max(dy, 0), h - max(-dy, 0))
    xs_src = slice(max(dx, 0), w - max(-dx, 0))
    out[ys_dst, xs_dst] = field_[ys_src, xs_src]
    return out


# =========================================================================================
# Public generator
# =========================================================================================

def make_scene(
    seed: int,
    *,
    size: int | tuple[int, int] = 256,
    gsd: float = 0.5,
    building_density: float = 0.8,
    n_roads: int | None = None,
    trees: bool = True,
    tree_density: float = 22.0,
    shadows: bool = True,
    distractors: bool = True,
    blur_sigma: float = 0.6,
    noise_std: float = 0.015,
) -> AerialScene:
    """Draw one synthetic suburban aerial tile and its exact building cadaster.

    Deterministic by `seed`: every layer draws from its own ``numpy.random.Generator``
    spawned from ``SeedSequence(seed)``, never from the global NumPy or torch RNG. Because
    the streams are independent, ``trees=False`` or ``shadows=False`` give the same roads,
    buildings and roofs as the default scene of that seed, only without trees or shadows
    (``distractors=False`` frees space, so buildings may then differ).

    Args:
        seed: non-negative integer.
        size: tile size in pixels, ``S`` (square) or ``(H, W)``.
        gsd: ground sampling distance, metres per pixel (0.5 ~ the paper's tiles, where a
            house is 40-50 px across). Object sizes are drawn in metres and converted.
        building_density: in [0, 1], the chance that each free slot along a road gets a
            house (0 gives no buildings).
        n_roads: number of roads (1-3 are typical); None draws 1-3.
        trees: plant trees (they hide parts of roofs and cast shadows).
        tree_density: mean number of trees per hectare (a 256 px tile at 0.5 m is 1.6 ha).
        shadows: cast shadows of buildings, trees, sheds and cars.
        distractors: parking lots, driveways, sidewalks, bare-soil patches and unmapped
            sheds: building-coloured surfaces that are not in the cadaster.
        blur_sigma: standard deviation of the final Gaussian blur, in pixels.
        noise_std: standard deviation of the additive Gaussian sensor noise.

    Returns:
        An `AerialScene`; its `polygons` all lie inside the tile and no two of them touch
        (at least 1.5 m apart).

    Raises:
        ValueError: a negative seed, a non-positive size or gsd, a density outside [0, 1].
    """
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 16 or width < 16:
        raise ValueError(f"tile size must be at least 16 x 16 pixels, got {height} x {width}")
    if not gsd > 0:
        raise ValueError(f"gsd must be positive, got {gsd}")
    if not 0 <= building_density <= 1:
        raise ValueError(f"building_density must be in [0, 1], got {building_density}")
    if n_roads is not None and n_roads < 1:
        raise ValueError(f"n_roads must be at least 1, got {n_roads}")

    with _single_torch_thread():
        return _draw_scene(int(seed), height, width, gsd, building_density, n_roads, trees, tree_density, shadows,
                           distractors, blur_sigma, noise_std)


@contextlib.contextmanager
def _single_torch_thread():
    """Run torch ops single-threaded inside the block, restoring the thread count after.

    A scene is hundreds of small tensor ops; with 2 intra-op threads each one becomes a
    parallel region whose threads must both get a core, and on a busy 2-core machine that
    made a scene ~5x slower (0.8 s instead of 0.15 s). Data-parallel callers should use
    processes (DataLoader workers), which this does not affect.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _draw_scene(seed: int, height: int, width: int, gsd: float, building_density: float, n_roads: int | None,
                trees: bool, tree_density: float, shadows: bool, distractors: bool, blur_sigma: float,
                noise_std: float) -> AerialScene:
    """`make_scene` after validation: the layers in order, then the scene record."""
    builder = _SceneBuilder(seed, height, width, gsd)
    rng = builder.stream("sun")
    sun_azimuth = rng.uniform(0, 2 * math.pi)
    sun = np.array([math.cos(sun_azimuth), math.sin(sun_azimuth)])
    elevation = math.radians(rng.uniform(35, 65))

    builder.draw_ground(distractors)
    builder.plan_roads(n_roads)
    builder.draw_roads(distractors)
    if distractors:
        builder.place_parking_lots()
    builder.place_buildings(building_density)
    if distractors:
        builder.place_driveways()
        builder.place_sheds()
    builder.draw_roofs(sun)
    if trees:
        builder.plant_trees(tree_density)
    builder.add_tree_heights()
    if shadows:
        builder.cast_shadows(sun, elevation, strength=rng.uniform(0.5, 0.7))
    builder.draw_trees(sun)
    image = builder.finish(blur_sigma, noise_std)

    polygons = [torch.from_numpy(b.polygon.astype(np.float64)) for b in builder.buildings]
    visibility = _visibility(polygons, builder.tree_mask)
    trees_ = builder.trees
    return AerialScene(
        image=image,
        polygons=polygons,
        building_heights=torch.tensor([b.height_m for b in builder.buildings], dtype=torch.float64),
        roof_kinds=[b.roof_kind for b in builder.buildings],
        building_visibility=visibility,
        tree_centres=torch.tensor(np.array([t[0] for t in trees_]).reshape(-1, 2), dtype=torch.float64),
        tree_radii=torch.tensor([t[1] for t in trees_], dtype=torch.float64),
        tree_heights=torch.tensor([t[2] for t in trees_], dtype=torch.float64),
        road_centrelines=[torch.from_numpy(r.points.copy()) for r in builder.roads],
        road_mask=builder.road_mask,
        paved_mask=builder.paved_mask & ~builder.road_mask & ~(rasterize(polygons, height, width)[0] > 0),
        shed_mask=builder.shed_mask,
        tree_mask=builder.tree_mask,
        shadow_mask=builder.shadow_mask,
        sun_direction=torch.from_numpy(sun),
        sun_elevation_deg=math.degrees(elevation),
        gsd=gsd,
        seed=seed,
    )


def _visibility(polygons: list[Tensor], tree_mask: Tensor) -> Tensor:
    """(B,) fraction of each footprint's pixels with crown opacity below 0.5."""
    h, w = tree_mask.shape
    out = torch.ones(len(polygons), dtype=torch.float64)
    for i, polygon in enumerate(polygons):
        patch = polygon_patch(polygon, h, w)
        if patch is None or not patch.inside.any():
            continue
        rows, cols = patch.slices()
        hidden = tree_mask[rows, cols][patch.inside] >= 0.5
        out[i] = 1.0 - hidden.double().mean()
    return out

