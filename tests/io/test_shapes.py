"""Shapes-layer content ↔ level-0 annotations."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet.io.annotation import Annotation, rectangle
from napari_magnet.io.coords import box_to_world_rect
from napari_magnet.io.shapes import annotations_to_shapes, recorded_mpp, shapes_to_annotations

from .samples import MPP


def test_shapes_annotations_round_trip_with_classes_states_and_types():
    anns = [
        Annotation(
            rectangle(10, 20, 110, 220), name="a", classification="Tumor", review="accepted"
        ),
        Annotation(
            np.array([[0, 0], [50, 10], [20, 40]], float),
            name="b",
            classification=None,
            review="rejected",
        ),
    ]
    shapes = annotations_to_shapes(anns, MPP)
    assert shapes.shape_types == ["rectangle", "polygon"]
    assert shapes.features["class"] == ["Tumor", ""]
    back, skipped = shapes_to_annotations(shapes.data, shapes.shape_types, shapes.features, MPP)
    assert skipped == []
    for a, b in zip(anns, back):
        np.testing.assert_allclose(b.polygon, a.polygon)
        assert (b.classification, b.review, b.name) == (a.classification, a.review, a.name)
    assert recorded_mpp(back) == MPP


def test_shapes_to_annotations_ellipses_and_lines():
    ellipse = box_to_world_rect((0, 0, 100, 50), None)
    line = np.array([[0.0, 0.0], [10.0, 10.0]])
    anns, skipped = shapes_to_annotations(
        [ellipse, line], ["ellipse", "line"], {"class": ["Other", ""]}, None
    )
    assert skipped == ["shape 1: line"]
    assert len(anns) == 1 and len(anns[0].polygon) == 64
    x0, y0, x1, y1 = anns[0].bbox
    assert (x0, y0, x1, y1) == pytest.approx((0, 0, 100, 50), abs=0.2)
