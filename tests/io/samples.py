"""Shared test data of the io tests: annotations of every kind, MagnifySteps, an mpp."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet.engine.types import MagnifyStep
from napari_magnet.io.annotation import Annotation, rectangle

MPP = (0.5, 0.25)  # (mpp_x, mpp_y): deliberately anisotropic


def star(cx: float, cy: float, r: float, n: int = 11) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rr = np.where(np.arange(n) % 2 == 0, r, r * 0.45)
    return np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], axis=1)


def sample_annotations() -> list[Annotation]:
    return [
        Annotation(
            polygon=rectangle(100.0, 200.0, 612.5, 712.25),
            name="tumour box",
            classification="Tumor",
            review="accepted",
            measurements={"Attention mass": 0.42, "Layer": 1.0},
            color=(10, 20, 30),
        ),
        Annotation(
            polygon=star(5000.3, 4000.7, 800.0),
            name="irregular",
            classification=None,
            review="rejected",
            measurements={"Area": 12345.678},
            properties={"isLocked": True, "custom": {"a": [1, 2]}},
        ),
        Annotation(
            polygon=np.array([[0, 0], [1000, 0], [1000, 900], [0, 900]], float),
            name="with hole",
            classification="Stroma",  # not a default class: hashed colour
            holes=[rectangle(100, 100, 300, 300)],
        ),
        Annotation(polygon=star(20.0, 30.0, 10.0, 7), name=""),
    ]


def assert_same(a: Annotation, b: Annotation) -> None:
    np.testing.assert_allclose(b.polygon, a.polygon)
    assert b.name == a.name
    assert b.classification == a.classification
    assert b.review == a.review
    assert b.measurements == pytest.approx(a.measurements)
    assert b.object_type == a.object_type
    assert len(b.holes) == len(a.holes)
    for ha, hb in zip(a.holes, b.holes):
        np.testing.assert_allclose(hb, ha)


def step(layer, boxes, ids, parents=None, maps=None, att_boxes=None):
    boxes = np.asarray(boxes, dtype=float)
    n = len(boxes)
    return MagnifyStep(
        layer=layer,
        region_ids=ids,
        parent_ids=parents or [""] * n,
        boxes=boxes,
        levels=np.zeros(n, int),
        attention_maps=maps if maps is not None else [np.ones((4, 4))],
        attention_boxes=np.asarray(
            att_boxes if att_boxes is not None else [[0, 0, 100, 100]], dtype=float
        ),
        attention_mass=np.full(n, 0.5),
        scales=np.full(n, 0.5),
        aux_probability=0.7,
    )
