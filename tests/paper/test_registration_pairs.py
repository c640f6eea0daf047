"""Reading real image / cadaster pairs (netsim_paper.registration.pairs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from netsim_paper.registration.pairs import load_pairs


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
    rectangle = torch.tensor([[2.0, 2.0], [10.0, 2.0], [10.0, 8.0], [2.0, 8.0]], dtype=torch.float64)
    assert torch.equal(pairs[0].polygons[0], rectangle)  # closing vertex dropped
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
