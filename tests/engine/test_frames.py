"""Region geometry (engine/frames.py): child frames, clipping, patch frames, visibility."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet.engine.frames import (
    child_frames,
    clip_boxes,
    patch_frames,
    start_region,
    visible_mask,
)


def test_child_frames_follow_theta_and_stay_inside_parent():
    frames = np.array([[0.0, 0.0, 1000.0, 1000.0]])
    visible = np.array([[100.0, 0.0, 900.0, 1000.0]])
    theta = np.array(
        [
            [
                [[1, 0, 0], [0, 1, 0]],  # identity: same frame
                [[0.25, 0, 0.5], [0, 0.25, -0.5]],  # quarter size, right-top
                [[0.1, 0, -0.95], [0, 0.1, 0]],
            ]
        ],  # crosses the parent's left edge
        dtype=float,
    )
    child, child_visible = child_frames(frames, visible, theta)
    np.testing.assert_allclose(child[0], frames[0])
    np.testing.assert_allclose(child_visible[0], visible[0])
    np.testing.assert_allclose(child[1], [625, 125, 875, 375])
    assert child_visible[2][0] == pytest.approx(100.0)
    assert (child_visible[:, :2] >= visible[0, :2] - 1e-9).all()
    assert (child_visible[:, 2:] <= visible[0, 2:] + 1e-9).all()


def test_clip_patch_frames_visibility_and_start_region():
    boxes = np.array([[-10.0, 5, 20, 30], [200, 200, 300, 300]])
    clipped = clip_boxes(boxes, np.array([0.0, 0, 100, 100]))
    assert clipped.tolist() == [[0, 5, 20, 30], [100, 100, 100, 100]]
    frames = patch_frames(np.array([0.0, 0, 100, 100]), np.array([[0.5, 0.5], [0.1, 0.9]]), 10)
    assert frames.tolist() == [[45, 45, 55, 55], [5, 85, 15, 95]]
    mask = visible_mask(np.array([0.0, 0, 100, 100]), np.array([0.0, 0, 50, 100]), (2, 4))
    assert mask.tolist() == [[True, True, False, False]] * 2

    class Dims:
        dimensions = (200, 100)

    frame, visible = start_region(Dims(), (150, -10, 50, 60))
    assert visible.tolist() == [[50, 0, 150, 60]]
    assert frame.tolist() == [[50, -20, 150, 80]]
