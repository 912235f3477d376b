"""Region geometry in level-0 pixels (DESIGN §2, §4): frames, visible boxes and child regions.

A region is a square *frame* in level-0 pixels ``(x0, y0, x1, y1)`` plus the *visible* box
inside it (the part of the frame that belongs to the region; the rest is black padding).
Layer 1's frame is the square around the whole slide (or around a user's box); a child
region's frame is its parent's frame mapped through θ and its visible box is that frame
clipped to the parent's visible box. Pure numpy: every family, the engine and the trainer
share these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "chain_frames",
    "child_frames",
    "clip_boxes",
    "mass_inside",
    "patch_frames",
    "slide_frame",
    "start_region",
    "visible_mask",
]

Box = Sequence[float]


def slide_frame(slide: Any) -> tuple[np.ndarray, np.ndarray]:
    """Layer 1's region: the square frame centred on the slide, and the slide as visible box."""
    width, height = slide.dimensions
    side = float(max(width, height))
    cx, cy = width / 2.0, height / 2.0
    frame = np.array([[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]])
    visible = np.array([[0.0, 0.0, float(width), float(height)]])
    return frame, visible


def child_frames(
    frames: np.ndarray, visible: np.ndarray, theta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Map each parent's frame through its θs (``align_corners=False`` convention).

    Parameters
    ----------
    frames, visible : np.ndarray
        ``(N, 4)`` parent frames and visible boxes.
    theta : np.ndarray
        ``(N, P, 2, 3)`` affine maps ``[[s, 0, t_x], [0, s, t_y]]`` from a child's normalised
        coordinates to its parent's (input-major: child ``n * P + p``).

    Returns
    -------
    (np.ndarray, np.ndarray)
        ``(N * P, 4)`` child frames and child visible boxes (frames clipped to the parent's
        visible box; a child that misses it entirely gets an empty box at the nearest edge).
    """
    n, p = theta.shape[:2]
    centre = (frames[:, :2] + frames[:, 2:]) / 2.0
    half = (frames[:, 2:] - frames[:, :2]) / 2.0
    sx, sy = theta[..., 0, 0], theta[..., 1, 1]
    tx, ty = theta[..., 0, 2], theta[..., 1, 2]
    ccx = centre[:, None, 0] + tx * half[:, None, 0]
    ccy = centre[:, None, 1] + ty * half[:, None, 1]
    hx, hy = sx * half[:, None, 0], sy * half[:, None, 1]
    child = np.stack([ccx - hx, ccy - hy, ccx + hx, ccy + hy], axis=-1).reshape(n * p, 4)
    return child, clip_boxes(child, np.repeat(visible, p, axis=0))


def clip_boxes(boxes: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Clip ``(N, 4)`` boxes to ``visible`` (one ``(4,)`` box or ``(N, 4)``); a box that misses
    it entirely becomes an empty box at the nearest edge."""
    visible = np.broadcast_to(np.asarray(visible, dtype=np.float64), boxes.shape)
    lo = np.minimum(np.maximum(boxes[:, :2], visible[:, :2]), visible[:, 2:])
    hi = np.maximum(np.minimum(boxes[:, 2:], visible[:, 2:]), lo)
    return np.concatenate([lo, hi], axis=1)


def start_region(slide: Any, box: Box | None) -> tuple[np.ndarray, np.ndarray]:
    """Frame and visible box of layer 1: the whole slide, or a user's box inside it.

    Raises
    ------
    ValueError
        The box is not finite, has no area, or lies outside the slide.
    """
    if box is None:
        return slide_frame(slide)
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = slide.dimensions
    if not np.all(np.isfinite([x0, y0, x1, y1])):
        raise ValueError(f"box {tuple(box)} is not finite")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, x1 = max(x0, 0.0), min(x1, float(width))
    y0, y1 = max(y0, 0.0), min(y1, float(height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"box {tuple(box)} has no area inside the slide ({width} x {height})")
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    frame = np.array([[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]])
    return frame, np.array([[x0, y0, x1, y1]])


def mass_inside(
    maps: np.ndarray, frames: np.ndarray, boxes: np.ndarray, per_input: int
) -> np.ndarray:
    """Attention mass of each input's map that falls inside each of its child boxes."""
    n, h, w = maps.shape
    masses = np.zeros(len(boxes))
    for r, box in enumerate(boxes):
        frame = frames[r // per_input]
        fx = (np.arange(w) + 0.5) / w * (frame[2] - frame[0]) + frame[0]
        fy = (np.arange(h) + 0.5) / h * (frame[3] - frame[1]) + frame[1]
        inside_x = (fx >= box[0]) & (fx < box[2])
        inside_y = (fy >= box[1]) & (fy < box[3])
        masses[r] = maps[r // per_input][np.ix_(inside_y, inside_x)].sum()
    return masses


def patch_frames(frame: np.ndarray, centres: np.ndarray, side: float) -> np.ndarray:
    """Square level-0 frames of ``side`` around view-normalised ``centres`` ``(n, 2)``."""
    size = frame[2] - frame[0]
    cx = frame[0] + centres[:, 0] * size
    cy = frame[1] + centres[:, 1] * size
    half = side / 2.0
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)


def chain_frames(frame1: np.ndarray, centres: np.ndarray, half: np.ndarray) -> np.ndarray:
    """Level-0 square frames of patches given in layer 1's normalized frame.

    Parameters
    ----------
    frame1 : np.ndarray
        ``(4,)`` layer 1's square frame ``(X0, Y0, X0 + W, Y0 + W)``.
    centres : np.ndarray
        ``(N, 2)`` patch centres ``(T_x, T_y)`` in layer 1's normalized coordinates
        (``align_corners=False``: ±1 are the frame's edges, as in ``child_frames``).
    half : np.ndarray
        ``(N,)`` half-sides ``S`` in the same units.

    Returns
    -------
    np.ndarray
        ``(N, 4)`` boxes ``X0 + W (T − S + 1) / 2 … X0 + W (T + S + 1) / 2``.
    """
    x0, y0 = float(frame1[0]), float(frame1[1])
    w = float(frame1[2] - frame1[0])
    lo = (centres - half[:, None] + 1.0) / 2.0 * w
    hi = (centres + half[:, None] + 1.0) / 2.0 * w
    return np.stack([x0 + lo[:, 0], y0 + lo[:, 1], x0 + hi[:, 0], y0 + hi[:, 1]], axis=1)


def visible_mask(frame: np.ndarray, box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Which cells of an ``(h, w)`` grid over the square ``frame`` have their centre in ``box``."""
    h, w = shape
    size = frame[2] - frame[0]
    xs = frame[0] + (np.arange(w) + 0.5) / w * size
    ys = frame[1] + (np.arange(h) + 0.5) / h * size
    return ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None]
