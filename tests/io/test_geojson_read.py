"""Reading GeoJSON: QuPath's exports and variants, bounds, hostile input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from napari_magnet.io.annotation import Annotation, GeoJSONError, GeoJSONSkipWarning, rectangle
from napari_magnet.io.geojson_read import COORD_LIMIT, load_geojson, parse_geojson, read_geojson
from napari_magnet.io.geojson_write import annotations_to_feature_collection, write_geojson

from .samples import sample_annotations as _sample_annotations

# --------------------------------------------------------------------------------------------
# QuPath exports
# --------------------------------------------------------------------------------------------

QUPATH_EXPORT = {
    "type": "FeatureCollection",
    "features": [
        {
            "type": "Feature",
            "id": "0b7cf9a3-2a3e-4f7d-8f45-38a8d1b6d1f3",
            "geometry": {
                "type": "Polygon",
                "coordinates": [
                    [[10234, 20456], [11234, 20456], [11234, 21456], [10234, 21456], [10234, 20456]]
                ],
            },
            "properties": {
                "objectType": "annotation",
                "classification": {"name": "Tumor", "color": [200, 0, 0]},
                "isLocked": False,
            },
        },
        {
            "type": "Feature",
            "id": "4d9a6f0e-1b1c-4bb1-9f1e-0c3d2e7b8a55",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [
                    [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]],
                    [
                        [[500, 500], [900, 500], [700, 800], [500, 500]],
                        [[600, 550], [700, 550], [650, 600], [600, 550]],
                    ],
                ],
            },
            "properties": {
                "objectType": "annotation",
                "name": "two pieces",
                "classification": {"name": "Normal", "color": [0, 150, 0]},
                "measurements": {"Num Detections": 12, "Mean": float("nan")},
                "isLocked": False,
                "metadata": {"author": "pathologist"},
            },
        },
        {
            "type": "Feature",
            "id": "5e9a6f0e-1b1c-4bb1-9f1e-0c3d2e7b8a56",
            "geometry": {"type": "Point", "coordinates": [50, 50]},
            "properties": {"objectType": "annotation", "name": "a point"},
        },
    ],
}


def test_read_qupath_export(tmp_path):
    path = tmp_path / "qupath.geojson"
    # QuPath writes NaN measurements as a bare NaN token, which json accepts
    path.write_text(json.dumps(QUPATH_EXPORT, indent=2))
    with pytest.warns(GeoJSONSkipWarning, match="Point"):
        anns = read_geojson(path)
    assert len(anns) == 3  # rectangle + 2 MultiPolygon parts; the Point is skipped
    rect, part0, part1 = anns
    np.testing.assert_allclose(rect.polygon, rectangle(10234, 20456, 11234, 21456))
    assert rect.classification == "Tumor" and rect.class_color == (200, 0, 0)
    assert rect.review == "unreviewed" and rect.name == "" and rect.object_type == "annotation"
    assert rect.id == "0b7cf9a3-2a3e-4f7d-8f45-38a8d1b6d1f3"
    assert rect.properties == {"isLocked": False}

    assert part0.name == part1.name == "two pieces"
    assert part0.classification == part1.classification == "Normal"
    assert part0.measurements == {"Num Detections": 12.0}  # NaN dropped
    np.testing.assert_allclose(part0.polygon, rectangle(0, 0, 100, 100))
    assert part1.polygon.shape == (3, 2) and len(part1.holes) == 1
    assert part0.properties["napari_magnet"] == {
        "part": 0,
        "parts": 2,
        "source_id": "4d9a6f0e-1b1c-4bb1-9f1e-0c3d2e7b8a55",
    }
    assert part0.properties["metadata"] == {"author": "pathologist"}
    assert part0.id is None and part1.id is None

    result = load_geojson(path)
    assert len(result.annotations) == 3
    assert len(result.skipped) == 1 and "Point" in result.skipped[0]


def test_read_qupath_variants():
    ring = [[0, 0], [10, 0], [10, 10], [0, 0]]
    feature = {
        "type": "Feature",
        "id": "PathAnnotationObject",  # QuPath 0.2 wrote the class name as id
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "classification": {"name": "Tumor", "colorRGB": -3670016},  # QuPath 0.2 packed int
            "measurements": [{"name": "Area", "value": 50.0}],  # QuPath 0.2 list form
            "isLocked": False,
        },
    }
    # a single Feature, a bare list of Features, a bare geometry
    (one,) = parse_geojson(feature)
    assert one.classification == "Tumor" and one.class_color == (200, 0, 0)
    assert one.measurements == {"Area": 50.0}
    assert one.object_type == "annotation"
    assert len(parse_geojson([feature, feature])) == 2
    assert len(parse_geojson({"type": "Polygon", "coordinates": [ring]})) == 1
    # classification as a plain string, QuPath 0.5 "names", review as a plain key
    f2 = json.loads(json.dumps(feature))
    f2["properties"]["classification"] = "Other"
    f2["properties"]["review"] = "Accepted"
    (two,) = parse_geojson(json.dumps(f2).encode("utf-8"))
    assert two.classification == "Other" and two.class_color is None and two.review == "accepted"
    f2["properties"]["classification"] = {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}
    (three,) = parse_geojson(f2)
    assert three.classification == "Tumor: Positive"
    # GeometryCollection: polygons kept, lines skipped
    gc = {
        "type": "Feature",
        "properties": {},
        "geometry": {
            "type": "GeometryCollection",
            "geometries": [
                {"type": "Polygon", "coordinates": [ring]},
                {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
            ],
        },
    }
    with pytest.warns(GeoJSONSkipWarning):
        assert len(parse_geojson(gc)) == 1
    # an empty FeatureCollection is fine
    assert parse_geojson('{"type": "FeatureCollection", "features": []}') == []
    # a UTF-8 BOM is fine
    assert len(parse_geojson("\ufeff" + json.dumps(feature))) == 1


def test_an_exported_empty_collection_reads_back_empty(tmp_path):
    # what Export all writes as annotations.geojson when there are no annotations
    path = write_geojson(tmp_path / "annotations.geojson", [])
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}
    result = load_geojson(path)
    assert result.annotations == [] and result.skipped == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning either
        assert read_geojson(path) == []
    assert parse_geojson("[]") == []  # an empty list of Features (QuPath's bare form)
    # a collection of points only is still an error: there was something, and it is not areas
    with pytest.raises(GeoJSONError, match="only other geometry types"):
        parse_geojson(
            {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}
                ],
            }
        )


def test_max_extent():
    feature = {
        "type": "Feature",
        "properties": {},
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1005, 0], [1005, 500], [0, 0]]]},
    }
    assert len(parse_geojson(feature, max_extent=(1000, 800))) == 1  # within 1 % tolerance
    with pytest.raises(GeoJSONError, match="slide extent"):
        parse_geojson(feature, max_extent=(900, 800))
    with pytest.raises(GeoJSONError, match="slide extent"):
        parse_geojson(feature, max_extent=(1000, 800), extent_tolerance=0.0)


def test_bounds_on_features_and_vertices():
    ring = [[0, 0], [10, 0], [10, 10], [0, 0]]
    feature = {
        "type": "Feature",
        "properties": {},
        "geometry": {"type": "Polygon", "coordinates": [ring]},
    }
    fc = {"type": "FeatureCollection", "features": [feature] * 5}
    assert len(parse_geojson(fc, max_features=5)) == 5
    with pytest.raises(GeoJSONError, match="too many features"):
        parse_geojson(fc, max_features=4)
    with pytest.raises(GeoJSONError, match="too many vertices"):
        parse_geojson(fc, max_vertices=19)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("{", "malformed JSON"),
        ('{"type": "FeatureCollection", "features": [', "malformed JSON"),
        ("[1, 2, 3]", "not a Feature"),
        ('"hello"', "not GeoJSON"),
        ('{"a": 1}', "no 'type'"),
        ('{"type": "Topology"}', "unknown top-level type"),
        ('{"type": "FeatureCollection"}', "no 'features' list"),
        ('{"type": "Feature", "properties": {}}', "no 'geometry'"),
        ('{"type": "Feature", "geometry": {"type": "Polygon"}}', "no 'coordinates'"),
        ('{"type": "Feature", "geometry": {"type": "Circle", "coordinates": []}}', "unsupported"),
        (
            '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}',
            "only other geometry types",
        ),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [NaN, 1], [0, 0]]]}', "non-finite"),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1e400, 1], [0, 0]]]}',
            "non-finite",
        ),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [2e7, 1], [0, 0]]]}', "beyond"),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [99999999999999999999, 1]]]}',
            "beyond",
        ),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], ["1", 1], [0, 0]]]}', "non-numeric"),
        (
            '{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [true, 1], [0, 0]]]}',
            "non-numeric",
        ),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0], [1, 1]]]}', "3 distinct"),
        ('{"type": "Polygon", "coordinates": [[[0, 0], [1], [1, 1]]]}', "not an \\[x, y\\]"),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            '[[[0, 0], [1, 0], [1, 1]]]}, "properties": {"napari_magnet": {"review": "maybe"}}}',
            "review state",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            '[[[0, 0], [1, 0], [1, 1]]]}, "properties": {"classification": 7}}',
            "classification",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            '[[[0, 0], [1, 0], [1, 1]]]}, "properties": {"measurements": {"a": "x"}}}',
            "not a number",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
            '[[[0, 0], [1, 0], [1, 1]]]}, "properties": {"color": [300, 0, 0]}}',
            "colour",
        ),
        ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ],
)
def test_bad_geojson_messages(tmp_path, text, match):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(GeoJSONError, match=match) as info:
        read_geojson(path)
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(GeoJSONError, match="cannot read"):
        read_geojson(tmp_path / "missing.geojson")
    with pytest.raises(GeoJSONError, match="cannot read"):
        read_geojson(tmp_path)  # a directory
    binary = tmp_path / "binary.geojson"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(GeoJSONError, match="UTF-8"):
        read_geojson(binary)


# --------------------------------------------------------------------------------------------
# property-based: hostile input is always GeoJSONError, never partial
# --------------------------------------------------------------------------------------------

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                [
                    "type",
                    "features",
                    "geometry",
                    "coordinates",
                    "properties",
                    "geometries",
                    "id",
                    "name",
                    "classification",
                    "measurements",
                    "color",
                    "objectType",
                    "napari_magnet",
                    "review",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def _check_outcome(data) -> None:
    """Either a complete list of valid Annotations or a GeoJSONError — nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeoJSONSkipWarning)
        try:
            out = parse_geojson(data, source="hyp.geojson")
        except GeoJSONError as exc:
            assert "hyp.geojson" in str(exc)
            return
    assert isinstance(out, list)
    for ann in out:
        assert isinstance(ann, Annotation)
        assert ann.polygon.ndim == 2 and ann.polygon.shape[1] == 2
        assert len(np.unique(ann.polygon, axis=0)) >= 3
        assert np.all(np.isfinite(ann.polygon)) and np.all(np.abs(ann.polygon) <= COORD_LIMIT)


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(_json_values)
def test_random_json_structures(value):
    _check_outcome(value)
    _check_outcome(json.dumps(value))  # the same through the text path (NaN tokens included)


@_SETTINGS
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_random_text(text):
    _check_outcome(text)


def _valid_fc() -> dict:
    return annotations_to_feature_collection(_sample_annotations())


_BAD_COORDS = st.sampled_from(
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        1e12,
        -5e7,
        "12",
        None,
        True,
        [1, 2],
        {"x": 1},
        10**30,
    ]
)


@_SETTINGS
@given(data=st.data())
def test_one_bad_coordinate_rejects_the_whole_file(data):
    fc = _valid_fc()
    f = data.draw(st.integers(0, len(fc["features"]) - 1))
    rings = fc["features"][f]["geometry"]["coordinates"]
    r = data.draw(st.integers(0, len(rings) - 1))
    k = data.draw(st.integers(0, len(rings[r]) - 1))
    d = data.draw(st.integers(0, 1))
    rings[r][k][d] = data.draw(_BAD_COORDS)
    with pytest.raises(GeoJSONError):
        parse_geojson(fc)
    with pytest.raises(GeoJSONError):
        parse_geojson(json.dumps(fc))  # NaN/Infinity survive as JSON tokens


_REQUIRED_PATHS = [
    ("type",),
    ("features",),
    ("features", 0, "type"),
    ("features", 0, "geometry"),
    ("features", 0, "geometry", "type"),
    ("features", 0, "geometry", "coordinates"),
    ("features", 1, "geometry", "coordinates", 0),
]


@_SETTINGS
@given(
    path=st.sampled_from(_REQUIRED_PATHS),
    replacement=st.sampled_from(["drop", None, 1, "x", [], {}, [[]], [[[0, 0]]]]),
)
def test_missing_or_wrong_fields(path, replacement):
    fc = _valid_fc()
    parent = fc
    for key in path[:-1]:
        parent = parent[key]
    if replacement == "drop":
        if isinstance(parent, list):
            parent[path[-1]] = "dropped"
        else:
            del parent[path[-1]]
    else:
        # geometry: None is legitimately skipped, which leaves the other features valid
        assume(not (path[-1] == "geometry" and replacement is None))
        assume(not (path == ("features",) and replacement == []))  # an empty collection
        parent[path[-1]] = replacement
    with pytest.raises(GeoJSONError):
        parse_geojson(fc)


@_SETTINGS
@given(
    kind=st.sampled_from(
        ["Point", "LineString", "MultiPoint", "MultiLineString", "Circle", "polygon", "", "Feature"]
    ),
    n=st.integers(1, 4),
)
def test_wrong_geometry_types_only(kind, n):
    coords = {
        "Point": [1, 2],
        "MultiPoint": [[1, 2]],
        "LineString": [[1, 2], [3, 4]],
        "MultiLineString": [[[1, 2], [3, 4]]],
    }.get(kind, [[[0, 0], [1, 0], [1, 1]]])
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": kind, "coordinates": coords}}
        ]
        * n,
    }
    with pytest.raises(GeoJSONError):
        parse_geojson(fc)


@_SETTINGS
@given(data=st.data())
def test_truncated_text(data):
    text = json.dumps(_valid_fc())
    cut = data.draw(st.integers(0, len(text) - 1))
    with pytest.raises(GeoJSONError):
        parse_geojson(text[:cut])


def test_truncated_file(tmp_path):
    full = write_geojson(tmp_path / "full.geojson", _sample_annotations()).read_bytes()
    for cut in (0, 1, len(full) // 3, len(full) // 2, len(full) - 3):
        p = tmp_path / f"cut{cut}.geojson"
        p.write_bytes(full[:cut])
        with pytest.raises(GeoJSONError, match=f"cut{cut}"):
            read_geojson(p)
