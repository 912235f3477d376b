"""Steps and annotations → layer data (pure numpy, no viewer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_magnet.engine.types import MagnifyStep
from napari_magnet.io.geojson import Annotation, rectangle
from napari_magnet.io.layerdata import (
    ROI_FEATURES,
    UNEXAMINED,
    annotations_to_shapes,
    attention_box_from_layer,
    attention_layer_data,
    box_to_world_rect,
    coverage_map,
    coverage_placement,
    coverage_summary,
    level0_to_world,
    recorded_mpp,
    resize_mask,
    review_style,
    roi_layer_data,
    shapes_box_level0,
    shapes_to_annotations,
    tissue_mask,
    world_to_level0,
)

MPP = (0.5, 0.25)  # (mpp_x, mpp_y): deliberately anisotropic


def step(layer, boxes, ids, parents=None, maps=None, att_boxes=None):
    boxes = np.asarray(boxes, dtype=float)
    n = len(boxes)
    return MagnifyStep(
        layer=layer, region_ids=ids, parent_ids=parents or [""] * n, boxes=boxes,
        levels=np.zeros(n, int),
        attention_maps=maps if maps is not None else [np.ones((4, 4))],
        attention_boxes=np.asarray(att_boxes if att_boxes is not None else [[0, 0, 100, 100]],
                                   dtype=float),
        attention_mass=np.full(n, 0.5), scales=np.full(n, 0.5), aux_probability=0.7)


def test_world_and_level0_round_trip():
    xy = np.array([[10.0, 20.0], [0.0, 0.0], [1234.5, 99.25]])
    rc = level0_to_world(xy, MPP)
    np.testing.assert_allclose(rc[0], [20 * 0.25, 10 * 0.5])
    np.testing.assert_allclose(world_to_level0(rc, MPP), xy)
    # a layer with its own scale/translate
    data = (rc - [3.0, 4.0]) / [2.0, 2.0]
    np.testing.assert_allclose(world_to_level0(data, MPP, (2.0, 2.0), (3.0, 4.0)), xy)
    np.testing.assert_allclose(world_to_level0(rc, None), rc[:, ::-1])


def test_box_to_world_rect_corners():
    rect = box_to_world_rect((10, 20, 30, 60), MPP)
    assert rect.shape == (4, 2)
    assert rect[:, 0].min() == pytest.approx(20 * 0.25) and rect[:, 0].max() == pytest.approx(15)
    assert rect[:, 1].min() == pytest.approx(5) and rect[:, 1].max() == pytest.approx(15)


def test_shapes_box_level0_uses_both_layers_transforms():
    verts = np.array([[5.0, 5.0], [15.0, 25.0]])  # (row, col) in the shapes layer's data
    box = shapes_box_level0(verts, (2.0, 2.0), (1.0, 1.0), (0.25, 0.5), (0.0, 0.0))
    # world rows 11..31 µm → y 44..124; world cols 11..51 µm → x 22..102
    assert box == pytest.approx((22.0, 44.0, 102.0, 124.0))


def test_roi_layer_data_features_and_colours():
    s = step(2, [[0, 0, 10, 10], [5, 5, 8, 9]], ["1.1", "1.2"], ["1", "1"])
    data = roi_layer_data(s, MPP)
    assert list(data.features) == list(ROI_FEATURES)
    assert data.features["id"] == ["1.1", "1.2"]
    assert data.features["parent"] == ["1", "1"]
    assert data.features["layer"] == [2, 2]
    assert data.features["aux_probability"] == [0.7, 0.7]
    assert data.features["review"] == ["unreviewed"] * 2
    assert data.edge_colors.shape == (2, 4)
    np.testing.assert_allclose(data.rects[1], box_to_world_rect((5, 5, 8, 9), MPP))


def test_attention_placement_centres_pixels_and_crops_to_slide():
    amap = np.arange(16, dtype=float).reshape(4, 4)
    placed = attention_layer_data(amap, (-20, 0, 20, 40), MPP, slide_dims=(30, 40))
    # map pixels are 10 x 10 level-0 px; columns centred at x = -15, -5, 5, 15: the two
    # centred left of the slide (black padding) are dropped
    assert placed.data.shape == (4, 2)
    np.testing.assert_array_equal(placed.data, amap[:, 2:])
    assert placed.box == pytest.approx((0, 0, 20, 40))
    assert placed.scale == pytest.approx((10 * 0.25, 10 * 0.5))
    # translate: the top-left kept pixel's centre (x = 5, y = 5) in µm, not its corner
    assert placed.translate == pytest.approx((5 * 0.25, 5 * 0.5))
    assert placed.contrast_limits == pytest.approx((2.0, 15.0))
    back = attention_box_from_layer(placed.data.shape, placed.scale, placed.translate, MPP)
    assert back == pytest.approx(placed.box)


@given(st.integers(1, 64), st.integers(1, 64),
       st.tuples(st.floats(-500, 500), st.floats(-500, 500), st.floats(1, 800),
                 st.floats(1, 800)))
@settings(max_examples=60, deadline=None)
def test_attention_placement_inverts(h, w, box):
    x0, y0, bw, bh = box
    placed = attention_layer_data(np.ones((h, w)), (x0, y0, x0 + bw, y0 + bh), MPP)
    back = attention_box_from_layer((h, w), placed.scale, placed.translate, MPP)
    assert back == pytest.approx((x0, y0, x0 + bw, y0 + bh), abs=1e-6)


def test_tissue_mask_excludes_glass_black_and_grey():
    rgb = np.array([[[250, 250, 250], [0, 0, 0], [128, 128, 128], [200, 100, 180]]],
                   dtype=np.uint8)
    assert tissue_mask(rgb).tolist() == [[False, False, False, True]]


def test_resize_mask_area_threshold():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    assert resize_mask(mask, (2, 2)).tolist() == [[True, False], [False, False]]
    up = resize_mask(mask, (16, 16))
    assert up.shape == (16, 16) and up[:8, :8].all() and not up[8:, 8:].any()


def test_coverage_map_deepest_layer_and_unexamined_tissue():
    steps = [step(1, [[0, 0, 50, 100]], ["1"]),
             step(2, [[0, 0, 25, 50]], ["1.1"], ["1"]),
             step(3, [[1, 1, 2, 2]], ["1.1.1"], ["1.1"])]  # smaller than a cell
    tissue = np.ones((10, 10), bool)
    tissue[:, 9] = False  # a glass column
    cov = coverage_map(steps, (100, 100), tissue)
    assert cov.shape == (10, 10) and cov.dtype == np.uint8
    assert cov[0, 0] == 3  # the tiny layer-3 region marks its cell
    assert cov[2, 1] == 2
    assert cov[8, 3] == 1
    assert cov[5, 7] == UNEXAMINED
    assert (cov[:, 9] == 0).all()
    summary = coverage_summary(cov)
    assert summary["unexamined"] == pytest.approx(40 / 90)
    assert summary["examined"] == pytest.approx(50 / 90)
    scale, translate = coverage_placement((100, 100), cov.shape, MPP)
    assert scale == pytest.approx((2.5, 5.0)) and translate == pytest.approx((1.25, 2.5))


def test_coverage_without_tissue_mask_covers_every_cell():
    cov = coverage_map([step(1, [[0, 0, 100, 100]], ["1"])], (100, 100), None, (4, 4))
    assert (cov == 1).all()


def test_shapes_annotations_round_trip_with_classes_states_and_types():
    anns = [
        Annotation(rectangle(10, 20, 110, 220), name="a", classification="Tumor",
                   review="accepted"),
        Annotation(np.array([[0, 0], [50, 10], [20, 40]], float), name="b",
                   classification=None, review="rejected"),
    ]
    shapes = annotations_to_shapes(anns, MPP)
    assert shapes.shape_types == ["rectangle", "polygon"]
    assert shapes.features["class"] == ["Tumor", ""]
    back, skipped = shapes_to_annotations(shapes.data, shapes.shape_types, shapes.features,
                                          MPP)
    assert skipped == []
    for a, b in zip(anns, back):
        np.testing.assert_allclose(b.polygon, a.polygon)
        assert (b.classification, b.review, b.name) == (a.classification, a.review, a.name)
    assert recorded_mpp(back) == MPP


def test_shapes_to_annotations_ellipses_lines_and_rois():
    ellipse = box_to_world_rect((0, 0, 100, 50), None)
    line = np.array([[0.0, 0.0], [10.0, 10.0]])
    anns, skipped = shapes_to_annotations(
        [ellipse, line], ["ellipse", "line"], {"class": ["Other", ""]}, None)
    assert skipped == ["shape 1: line"]
    assert len(anns) == 1 and len(anns[0].polygon) == 64
    x0, y0, x1, y1 = anns[0].bbox
    assert (x0, y0, x1, y1) == pytest.approx((0, 0, 100, 50), abs=0.2)

    s = step(1, [[0, 0, 10, 10]], ["1"])
    rois = roi_layer_data(s, MPP)
    rois.features["review"] = ["accepted"]
    out, _ = shapes_to_annotations(rois.rects, ["rectangle"], rois.features, MPP, kind="roi")
    ours = out[0].properties["napari_magnet"]
    assert ours["kind"] == "roi" and ours["region_id"] == "1" and ours["layer"] == 1
    assert out[0].measurements["Attention mass"] == 0.5 and out[0].review == "accepted"
    again = annotations_to_shapes(out, MPP, roi=True)
    assert again.features["id"] == ["1"] and again.features["review"] == ["accepted"]
    assert math.isclose(again.features["attention_mass"][0], 0.5)


def test_review_style_bold_accepted_thin_grey_rejected():
    edges, faces, widths = review_style(["Tumor", "Tumor", ""],
                                        ["accepted", "rejected", "unreviewed"])
    assert widths.tolist() == [2.5, 0.5, 1.0]
    np.testing.assert_allclose(edges[0][:3], np.array([200, 0, 0]) / 255)
    assert edges[1][0] == edges[1][1] == edges[1][2]  # grey
    assert faces[1][3] == 0 and faces[0][3] > 0 and faces[2][3] == 0
