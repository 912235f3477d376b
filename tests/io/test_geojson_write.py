"""QuPath-compatible GeoJSON writing: round trips, QuPath's keys, atomic files."""

from __future__ import annotations

import json
import math
import uuid

import numpy as np
import pytest

from napari_magnet.io.annotation import DEFAULT_CLASSES, Annotation, GeoJSONError, rectangle
from napari_magnet.io.colors import class_color
from napari_magnet.io.geojson_read import read_geojson
from napari_magnet.io.geojson_write import annotations_to_feature_collection, write_geojson

from .samples import assert_same as _assert_same
from .samples import sample_annotations as _sample_annotations

# --------------------------------------------------------------------------------------------
# round trip and QuPath's keys
# --------------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    anns = _sample_annotations()
    path = write_geojson(tmp_path / "a.geojson", anns)
    back = read_geojson(path)
    assert len(back) == len(anns)
    for a, b in zip(anns, back):
        _assert_same(a, b)
    assert back[0].color == (10, 20, 30)
    assert back[1].color is None
    assert back[1].properties["isLocked"] is True
    assert back[1].properties["custom"] == {"a": [1, 2]}
    assert back[0].class_color == DEFAULT_CLASSES["Tumor"]
    assert back[2].class_color == class_color("Stroma")
    # ids are valid UUIDs and stable: a second write of what was read gives the same ids
    ids = [json.loads(path.read_text())["features"][i]["id"] for i in range(len(anns))]
    for fid, b in zip(ids, back):
        assert str(uuid.UUID(fid)) == fid == b.id
    path2 = write_geojson(tmp_path / "b.geojson", back)
    assert json.loads(path2.read_text()) == json.loads(path.read_text())


def test_write_is_deterministic_and_atomic(tmp_path):
    anns = _sample_annotations()
    p1 = write_geojson(tmp_path / "x.geojson", anns)
    text = p1.read_text()
    write_geojson(tmp_path / "x.geojson", anns)
    assert p1.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.geojson"]  # no temp files left
    # a failed write leaves the previous file intact and no temp file behind
    bad = Annotation(polygon=np.array([[0, 0], [1, 1], [0, 0]], float), name="degenerate")
    with pytest.raises(GeoJSONError, match="3 distinct"):
        write_geojson(tmp_path / "x.geojson", [*anns, bad])
    assert p1.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.geojson"]


def test_qupath_required_keys():
    fc = annotations_to_feature_collection(_sample_annotations())
    assert fc["type"] == "FeatureCollection"
    json.dumps(fc, allow_nan=False)  # strictly valid JSON
    for feat in fc["features"]:
        assert feat["type"] == "Feature"
        uuid.UUID(feat["id"])
        geom = feat["geometry"]
        assert geom["type"] == "Polygon"
        for ring in geom["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4  # closed rings
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        assert isinstance(props["name"], str)
        assert props["isLocked"] in (True, False)
        assert all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in props["measurements"].values()
        )
        assert props["napari_magnet"]["review"] in ("unreviewed", "accepted", "rejected")
    tumour, irregular, stroma, plain = fc["features"]
    assert tumour["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert tumour["properties"]["color"] == [10, 20, 30]
    assert "classification" not in irregular["properties"]
    assert "classification" not in plain["properties"]
    assert set(stroma["properties"]["classification"]) == {"name", "color"}
    assert len(stroma["geometry"]["coordinates"]) == 2  # exterior + hole


def test_non_finite_measurements_are_dropped():
    ann = Annotation(
        polygon=rectangle(0, 0, 10, 10),
        measurements={"a": 1.5, "b": float("nan"), "c": float("inf"), "d": 3},
    )
    props = annotations_to_feature_collection([ann])["features"][0]["properties"]
    assert props["measurements"] == {"a": 1.5, "d": 3}
