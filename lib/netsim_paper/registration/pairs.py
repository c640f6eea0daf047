"""Real image / cadaster pairs read from a folder (the I/O of the registration experiments).

The synthetic scenes (`scenes`) have exact cadasters; a user with real orthophotos and their
(misaligned) building polygons reads them here, in the convention of
`netsim_paper.registration.geometry` (coordinates in pixels of the image).

Example:
    >>> from netsim_paper.registration.pairs import load_pairs
    >>> pairs = load_pairs("my_tiles/")   # doctest: +SKIP
    >>> pairs[0].image.shape, len(pairs[0].polygons)   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from netsim_paper.registration.geometry import as_polygon, rasterize

__all__ = ["AerialPair", "load_pairs"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_POLYGON_SUFFIXES = (".geojson", ".json", ".csv")


@dataclass
class AerialPair:
    """A real image and its (possibly misaligned) cadaster.

    Attributes:
        name: the common file stem.
        image: ``(3, H, W)`` float32 in [0, 1].
        polygons: list of ``(n, 2)`` float64 (x, y) pixel coordinates.
        image_path, polygon_path: where they were read from.
    """

    name: str
    image: Tensor
    polygons: list[Tensor]
    image_path: Path = field(repr=False)
    polygon_path: Path = field(repr=False)

    def raster(self, scale: float = 1.0, **kwargs) -> Tensor:
        return rasterize(self.polygons, self.image.shape[1], self.image.shape[2], scale=scale, **kwargs)


def load_pairs(folder: str | Path, *, bounds_tolerance: float = 0.05) -> list[AerialPair]:
    """Read real image + cadaster pairs that share a file stem.

    Every image ``<name>.png|jpg|jpeg|tif|tiff`` needs exactly one polygon file
    ``<name>.geojson|json|csv`` and vice versa. Polygon coordinates are pixels of that
    image, in the module's convention (x = column, y = row, tile = [0, W] x [0, H]):

    * GeoJSON: a FeatureCollection of Polygon / MultiPolygon features (or a bare
      geometry list); each exterior ring becomes one polygon (holes are dropped, with a
      warning: the rasteriser fills outlines); a repeated closing vertex is removed.
    * CSV: a header ``polygon_id,x,y`` and one row per vertex, vertices of a polygon in
      order, consecutive or not.

    Args:
        folder: the directory to read.
        bounds_tolerance: vertices may lie this fraction of the image size outside it
            (misaligned cadasters do spill over); further out is treated as a mismatch.

    Returns:
        Pairs sorted by name.

    Raises:
        FileNotFoundError: the folder does not exist, or an image or polygon file has no
            partner.
        ValueError: no pairs, unreadable files, malformed polygons, or polygons far outside
            their image (wrong image or coordinates not in pixels).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    images = _files_by_stem(folder, _IMAGE_SUFFIXES, "image")
    cadasters = _files_by_stem(folder, _POLYGON_SUFFIXES, "polygon")
    orphans = sorted(set(images) ^ set(cadasters))
    if orphans:
        details = [f"{images[n].name} has no polygon file" if n in images else f"{cadasters[n].name} has no image"
                   for n in orphans]
        raise FileNotFoundError(f"unpaired files in {folder}: " + "; ".join(details))
    if not images:
        raise ValueError(f"no image/polygon pairs in {folder} (images: {', '.join(_IMAGE_SUFFIXES)}; "
                         f"polygons: {', '.join(_POLYGON_SUFFIXES)})")
    pairs = []
    for name in sorted(images):
        image = _read_image(images[name])
        polygons = _read_polygons(cadasters[name])
        _check_bounds(polygons, image.shape[1], image.shape[2], bounds_tolerance, cadasters[name])
        pairs.append(AerialPair(name, image, polygons, images[name], cadasters[name]))
    return pairs


def _files_by_stem(folder: Path, suffixes: tuple[str, ...], kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in found:
                raise ValueError(f"two {kind} files for '{path.stem}': {found[path.stem].name} and {path.name}")
            found[path.stem] = path
    return found


def _read_image(path: Path) -> Tensor:
    """(3, H, W) float32 in [0, 1]; grey images are repeated, alpha is dropped."""
    try:
        array = _decode_image(path)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _decode_image(path: Path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] with Pillow, else matplotlib (which reads PNG on its own)."""
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.image as mpimg
        array = np.asarray(mpimg.imread(path), dtype=np.float32)
        if array.max() > 1.0:  # 8-bit data from a non-PNG reader
            array = array / 255.0
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        return array[..., :3]
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def _read_polygons(path: Path) -> list[Tensor]:
    if path.suffix.lower() == ".csv":
        return _read_polygon_csv(path)
    return _read_geojson(path)


def _read_geojson(path: Path) -> list[Tensor]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot parse GeoJSON {path}: {error}") from error
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        geometries = [feature.get("geometry") for feature in data.get("features", [])]
    elif isinstance(data, dict) and "coordinates" in data:
        geometries = [data]
    elif isinstance(data, list):
        geometries = data
    else:
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection, geometry or list of geometries")
    polygons, dropped_holes = [], 0
    for k, geometry in enumerate(geometries):
        if geometry is None:
            continue
        kind = geometry.get("type")
        if kind == "Polygon":
            rings_list = [geometry["coordinates"]]
        elif kind == "MultiPolygon":
            rings_list = geometry["coordinates"]
        else:
            raise ValueError(f"{path}: feature {k} is a {kind}, expected Polygon or MultiPolygon")
        for rings in rings_list:
            dropped_holes += len(rings) - 1
            polygons.append(_ring_to_polygon(rings[0], f"{path.name} feature {k}"))
    if dropped_holes:
        warnings.warn(f"{path}: dropped {dropped_holes} polygon hole(s); only exterior rings are used", stacklevel=3)
    return polygons


def _ring_to_polygon(ring, name: str) -> Tensor:
    array = np.asarray(ring, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] > 2:
        array = array[:, :2]  # drop z
    if array.ndim == 2 and len(array) > 3 and np.array_equal(array[0], array[-1]):
        array = array[:-1]  # GeoJSON repeats the first vertex
    return as_polygon(array, name=name)


def _read_polygon_csv(path: Path) -> list[Tensor]:
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            if header[:3] != ["polygon_id", "x", "y"]:
                raise ValueError(f"{path}: expected the header 'polygon_id,x,y', got {','.join(header)!r}")
            vertices: dict[str, list[tuple[float, float]]] = {}
            for line, row in enumerate(reader, start=2):
                try:
                    vertices.setdefault(row["polygon_id"].strip(), []).append((float(row["x"]), float(row["y"])))
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{path}:{line}: bad vertex {row}: {error}") from error
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    return [as_polygon(v, name=f"{path.name} polygon {pid}") for pid, v in vertices.items()]


def _check_bounds(polygons: list[Tensor], height: int, width: int, tolerance: float, path: Path) -> None:
    slack_x, slack_y = tolerance * width, tolerance * height
    for k, polygon in enumerate(polygons):
        lo, hi = polygon.min(0).values, polygon.max(0).values
        if lo[0] < -slack_x or lo[1] < -slack_y or hi[0] > width + slack_x or hi[1] > height + slack_y:
            raise ValueError(
                f"{path.name}: polygon {k} spans x [{lo[0]:.1f}, {hi[0]:.1f}], y [{lo[1]:.1f}, {hi[1]:.1f}], far "
                f"outside the {width} x {height} image: wrong image, or coordinates not in pixels?")
