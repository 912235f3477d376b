"""The ROI table: steps, GeoJSON and Shapes layers, and the round trips between them."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from napari_magnet.engine.types import MagnifyStep
from napari_magnet.io.annotation import rectangle
from napari_magnet.io.colors import branch_color
from napari_magnet.io.coords import box_to_world_rect
from napari_magnet.io.geojson_read import read_geojson
from napari_magnet.io.geojson_write import write_geojson
from napari_magnet.io.rois import MEASUREMENT_NAMES, ROI_FEATURES, RoiTable
from napari_magnet.io.shapes import shapes_to_annotations

from .samples import MPP, step
from .samples import assert_same as _assert_same


def _steps() -> list[MagnifyStep]:
    rng = np.random.default_rng(0)
    l1 = MagnifyStep(
        layer=1,
        region_ids=["1", "2", "3"],
        parent_ids=["", "", ""],
        boxes=np.array([[0, 0, 4096, 4096], [4096, 0, 8192, 4096], [0, 4096, 4096, 8192]], float),
        levels=np.array([2, 2, 2]),
        attention_maps=[rng.random((32, 32)).astype(np.float32)],
        attention_boxes=np.array([[0, 0, 16384, 16384]], float),
        attention_mass=np.array([0.5, 0.3, 0.2]),
        scales=np.array([0.25, 0.25, 0.25]),
        aux_probability=0.7,
    )
    l2 = MagnifyStep(
        layer=2,
        region_ids=["1.1", "1.2", "2.1", "3.1"],
        parent_ids=["1", "1", "2", "3"],
        boxes=np.array(
            [
                [0, 0, 1024, 1024],
                [1024, 0, 2048, 1024],
                [4096, 0, 5120, 1024],
                [0, 4096, 1024, 5120],
            ],
            float,
        ),
        levels=np.array([0, 0, 0, 0]),
        attention_maps=[rng.random((16, 16)).astype(np.float32) for _ in range(3)],
        attention_boxes=np.array(
            [[0, 0, 4096, 4096], [4096, 0, 8192, 4096], [0, 4096, 4096, 8192]], float
        ),
        attention_mass=np.array([0.2, 0.3, 0.25, 0.25]),
        scales=np.array([1.0, 1.0, 1.0, 1.0]),
        aux_probability=None,
    )
    return [l1, l2]


# --------------------------------------------------------------------------------------------
# MagnifyStep → ROIs
# --------------------------------------------------------------------------------------------


def test_from_steps_to_annotations(tmp_path):
    steps = _steps()
    anns = RoiTable.from_steps(steps, slide_name="slide_001.tif", probability=0.83).to_annotations()
    assert [a.name for a in anns] == ["1", "2", "3", "1.1", "1.2", "2.1", "3.1"]
    assert all(a.classification is None and a.review == "unreviewed" for a in anns)
    np.testing.assert_allclose(anns[1].polygon, rectangle(4096, 0, 8192, 4096))
    m = MEASUREMENT_NAMES
    first = anns[0].measurements
    assert first[m["attention_mass"]] == pytest.approx(0.5)
    assert first[m["scale"]] == pytest.approx(0.25)
    assert first[m["level"]] == 2 and first[m["layer"]] == 1
    assert first[m["aux_probability"]] == pytest.approx(0.7)
    assert first[m["probability"]] == pytest.approx(0.83)
    deep = anns[3].measurements
    assert m["aux_probability"] not in deep and deep[m["layer"]] == 2 and deep[m["level"]] == 0
    # colours: the three branches differ; deeper layers are lighter versions of their branch
    c1, c2, c3 = (a.color for a in anns[:3])
    assert len({c1, c2, c3}) == 3
    assert anns[3].color == anns[4].color != c1
    assert sum(anns[3].color) > sum(c1)
    assert anns[5].color != anns[3].color and anns[6].color != anns[3].color
    assert branch_color("2.1") == anns[5].color
    # lineage recorded, ids stable
    assert anns[3].properties["napari_magnet"]["parent_id"] == "1"
    again = RoiTable.from_steps(
        steps, slide_name="slide_001.tif", probability=0.83
    ).to_annotations()
    assert [a.id for a in again] == [a.id for a in anns]
    assert len({a.id for a in anns}) == len(anns)
    # and they survive a file round trip
    back = read_geojson(write_geojson(tmp_path / "rois.geojson", anns))
    for a, b in zip(anns, back):
        _assert_same(a, b)
        assert b.color == a.color and b.id == a.id
        assert b.properties["napari_magnet"]["region_id"] == a.name


def test_from_steps_without_optional_fields():
    step = MagnifyStep(
        layer=1,
        region_ids=["1"],
        parent_ids=[""],
        boxes=np.array([[0, 0, 10, 10]], float),
        levels=np.array([0]),
        attention_maps=[],
        attention_boxes=np.zeros((0, 4)),
    )
    (ann,) = RoiTable.from_steps([step], slide_name="s", probability=None).to_annotations()
    assert set(ann.measurements) == {MEASUREMENT_NAMES["level"], MEASUREMENT_NAMES["layer"]}
    with pytest.raises(ValueError, match="region ids"):
        RoiTable.from_steps(
            [
                MagnifyStep(
                    layer=1,
                    region_ids=["1", "2"],
                    parent_ids=["", ""],
                    boxes=np.zeros((1, 4)),
                    levels=np.zeros(1),
                    attention_maps=[],
                    attention_boxes=np.zeros((0, 4)),
                )
            ]
        )


# --------------------------------------------------------------------------------------------
# Shapes layers
# --------------------------------------------------------------------------------------------


def test_to_layer_data_features_and_colours():
    s = step(2, [[0, 0, 10, 10], [5, 5, 8, 9]], ["1.1", "1.2"], ["1", "1"])
    data = RoiTable.from_steps([s]).to_layer_data(MPP)
    assert list(data.features) == list(ROI_FEATURES)
    assert data.features["id"] == ["1.1", "1.2"]
    assert data.features["parent"] == ["1", "1"]
    assert data.features["layer"] == [2, 2]
    assert data.features["aux_probability"] == [0.7, 0.7]
    assert data.features["review"] == ["unreviewed"] * 2
    assert data.edge_colors.shape == (2, 4)
    np.testing.assert_allclose(data.rects[1], box_to_world_rect((5, 5, 8, 9), MPP))


def test_roi_layer_to_annotations_and_back():
    s = step(1, [[0, 0, 10, 10]], ["1"])
    rois = RoiTable.from_steps([s]).to_layer_data(MPP)
    rois.features["review"] = ["accepted"]
    out, _ = shapes_to_annotations(rois.rects, ["rectangle"], rois.features, MPP, kind="roi")
    ours = out[0].properties["napari_magnet"]
    assert ours["kind"] == "roi" and ours["region_id"] == "1" and ours["layer"] == 1
    assert out[0].measurements["Attention mass"] == 0.5 and out[0].review == "accepted"
    again = RoiTable.from_annotations(out).to_layer_data(MPP)
    assert again.features["id"] == ["1"] and again.features["review"] == ["accepted"]
    assert math.isclose(again.features["attention_mass"][0], 0.5)


# --------------------------------------------------------------------------------------------
# the table's round trips
# --------------------------------------------------------------------------------------------


def _assert_same_rows(a: RoiTable, b: RoiTable) -> None:
    assert len(a) == len(b)
    assert (a.ids, a.parent_ids, a.classes, a.reviews) == (
        b.ids,
        b.parent_ids,
        b.classes,
        b.reviews,
    )
    np.testing.assert_array_equal(a.layers, b.layers)
    np.testing.assert_array_equal(a.levels, b.levels)
    np.testing.assert_allclose(a.boxes, b.boxes, rtol=1e-12)
    for name in ("scales", "attention_mass", "aux_probability", "probability"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12)
    for i in range(len(a)):
        np.testing.assert_allclose(a.outline(i), b.outline(i), rtol=1e-12)


def test_steps_to_table_to_geojson_features_to_table():
    steps = _steps()
    steps[1].attention_mass = np.zeros(0)  # unknown for layer 2: NaN, no measurement
    table = RoiTable.from_steps(steps, slide_name="slide_001.tif", probability=0.83)
    table = table.with_review({"1": ("Tumor", "accepted"), "2.1": ("", "rejected")})
    assert table.classes[:2] == ("Tumor", "") and table.reviews[5] == "rejected"
    features = table.to_geojson_features(mpp=MPP, mark_as_roi=True)
    # what the writer puts in a file, feature for feature
    assert features == json.loads(json.dumps(features))
    ours = features[0]["properties"]["napari_magnet"]
    assert ours == {
        "slide": "slide_001.tif",
        "region_id": "1",
        "parent_id": "",
        "layer": 1,
        "kind": "roi",
        "mpp": list(MPP),
        "review": "accepted",
    }
    assert features[0]["properties"]["classification"]["name"] == "Tumor"
    assert "Attention mass" not in features[3]["properties"]["measurements"]
    back = RoiTable.from_geojson_features(json.loads(json.dumps(features)))
    _assert_same_rows(table, back)
    assert back.feature_ids == table.feature_ids
    assert back.slide_name == "slide_001.tif"
    assert math.isnan(back.attention_mass[3]) and back.levels[0] == 2
    # and the second trip changes nothing
    assert back.to_geojson_features(mpp=MPP, mark_as_roi=True) == features


def test_table_to_layer_data_to_table():
    table = RoiTable.from_steps(_steps(), probability=0.5).with_review(
        {"1.2": ("Other", "accepted")}
    )
    data = table.to_layer_data(MPP)
    assert data.shape_types == ["rectangle"] * len(table)
    assert list(data.features) == list(ROI_FEATURES)
    assert data.features["class"][4] == "Other" and data.features["review"][4] == "accepted"
    back = RoiTable.from_layer(data.rects, data.features, MPP, shape_types=data.shape_types)
    # the layer holds the slide probability (hovering an ROI shows it), not the feature ids
    assert (back.probability == 0.5).all() and back.feature_ids == (None,) * len(table)
    _assert_same_rows(table, back)
    again = back.to_layer_data(MPP)
    assert json.dumps(again.features) == json.dumps(data.features)  # NaN == NaN here
    for a, b in zip(again.rects, data.rects):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # a layer scaled and shifted (data → world) lands on the same level-0 boxes
    shifted = [(r - [3.0, 4.0]) / 2.0 for r in data.rects]
    moved = RoiTable.from_layer(shifted, data.features, MPP, scale=(2.0, 2.0), translate=(3.0, 4.0))
    np.testing.assert_allclose(moved.boxes, table.boxes, rtol=1e-12)


def test_from_layer_skips_lines_reads_ellipses_and_fills_missing_columns():
    rects = [
        box_to_world_rect((0, 0, 100, 50), None),
        np.array([[0.0, 0.0], [5.0, 5.0]]),
        box_to_world_rect((10, 10, 20, 20), None),
    ]
    features = {
        "id": [float("nan"), "x", None],
        "name": ["from name", "", "n3"],
        "class": ["Tumor", "", None],
        "review": ["bogus", "accepted", "rejected"],
        "level": [1.0, 2.0, float("nan")],
    }
    table = RoiTable.from_layer(
        rects, features, None, shape_types=["ellipse", "line", "rectangle"], slide_name=""
    )
    assert table.ids == ("from name", "n3")
    assert table.classes == ("Tumor", "") and table.reviews == ("unreviewed", "rejected")
    assert table.levels.tolist() == [1, -1] and table.layers.tolist() == [0, 0]
    assert table.parent_ids == ("", "") and table.slide_name is None
    assert len(table.outline(0)) == 64
    assert table.boxes[0] == pytest.approx((0, 0, 100, 50), abs=0.2)
    (ellipse, square) = table.to_annotations()
    # unknown numbers write no measurement; the level does
    assert ellipse.measurements == {"Level": 1.0} and square.measurements == {}
    assert "slide" not in ellipse.properties["napari_magnet"]


def test_table_checks_and_is_read_only():
    table = RoiTable.from_steps(_steps()[:1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.ids = ("x",)  # type: ignore[misc]
    with pytest.raises(ValueError):
        table.boxes[0, 0] = 1.0
    with pytest.raises(ValueError, match="review states"):
        table.with_review({"1": ("", "maybe")})
    with pytest.raises(ValueError, match="3 ids"):
        dataclasses.replace(table, parent_ids=("", ""))
    assert len(RoiTable.from_steps([])) == 0
    assert RoiTable.from_steps([]).to_annotations() == []
    assert RoiTable.from_steps([]).to_layer_data(MPP).edge_colors.shape == (0, 4)


def test_to_geojson_features_match_the_written_file(tmp_path):
    table = RoiTable.from_steps(_steps(), slide_name="s.tif").with_review(
        {"3.1": ("Normal", "accepted")}
    )
    path = write_geojson(tmp_path / "rois.geojson", table.to_annotations(mark_as_roi=True))
    assert json.loads(path.read_text())["features"] == table.to_geojson_features(mark_as_roi=True)


# --------------------------------------------------------------------------------------------
# labels and hover text
# --------------------------------------------------------------------------------------------


def test_each_layer_labels_another_corner_smaller_with_depth():
    from napari_magnet.io.roi_columns import LABEL_ANCHORS, label_anchor, label_size

    assert [label_anchor(k) for k in (1, 2, 3, 4)] == list(LABEL_ANCHORS)
    assert len(set(LABEL_ANCHORS)) == 4 and label_anchor(0) == label_anchor(1)
    sizes = [label_size(k) for k in (1, 2, 3, 4, 9)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] >= 7


def test_label_layout_hides_tiny_rois_and_labels_that_would_overlap():
    from napari_magnet.io.roi_columns import label_layout

    boxes = np.array(
        [
            [0, 0, 100, 100],  # "1", layer 1, upper left
            [0, 0, 100, 100],  # "1.1": the frozen patch, same box, lower right: no clash
            [50, 50, 60, 60],  # "1.2": 10 × 10 world units
            [52, 52, 62, 62],  # "1.2.1"
            [52.5, 52.5, 62.5, 62.5],  # "1.2.3", a sibling half a unit further
            [70, 10, 70.5, 10.5],  # a 0.5 × 0.5 child
        ]
    )
    anchors = [
        "upper_left",
        "lower_right",
        "upper_left",
        "upper_right",
        "upper_right",
        "lower_left",
    ]
    texts = ["1", "1.1", "1.2", "1.2.1", "1.2.3", "1.2.2"]
    sizes = [12, 10.5, 10.5, 9, 9, 9]
    far = label_layout(boxes, anchors, sizes, texts, zoom=1.0)
    # at zoom 1 a 10-unit ROI is 10 px on screen: only the big ones are labelled
    assert far.tolist() == [True, True, False, False, False, False]
    near = label_layout(boxes, anchors, sizes, texts, zoom=20.0)
    # at zoom 20 the siblings are labelled but "1.2.3" would print over "1.2.1"
    assert near.tolist() == [True, True, True, True, False, False]
    closer = label_layout(boxes, anchors, sizes, texts, zoom=200.0)
    assert closer.tolist() == [True, True, True, True, True, True]


def test_roi_description_names_what_a_pathologist_asks_for():
    from napari_magnet.io.roi_columns import roi_description

    row = {
        "id": "1.2.3",
        "layer": 3,
        "attention_mass": 0.1234,
        "level": 0,
        "probability": 0.513,
        "aux_probability": float("nan"),
        "class": "Tumor",
        "review": "accepted",
    }
    assert roi_description(row) == (
        "ROI 1.2.3 · layer 3 · attention mass 0.123 · pyramid level 0 · p = 0.51 · Tumor, accepted"
    )
    row.update(level=-1, attention_mass=float("nan"), aux_probability=0.7, review="unreviewed")
    assert roi_description(row) == "ROI 1.2.3 · layer 3 · p = 0.51 · aux p = 0.70 · Tumor"
