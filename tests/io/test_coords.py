"""Level-0 pixels ↔ world µm: points, boxes, shapes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet.io.coords import (
    box_to_world_rect,
    level0_to_world,
    shapes_box_level0,
    world_to_level0,
)

from .samples import MPP


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
