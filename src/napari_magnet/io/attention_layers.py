"""Attention maps placed on the slide as napari image data (pure numpy; no napari import).

napari places pixel *centres* at ``translate + index · scale``, so the ``translate`` of a map
covering a level-0 box is the box's top-left plus half a map pixel, in world µm (DESIGN §2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .coords import mpp_or_unit

__all__ = [
    "AttentionLayerData",
    "attention_box_from_layer",
    "attention_layer_data",
    "composite_attention",
]


@dataclass
class AttentionLayerData:
    """An attention map placed on the slide.

    Attributes
    ----------
    data : np.ndarray
        ``(h, w)`` float32 map (cropped to the slide when asked).
    box : (x0, y0, x1, y1)
        Level-0 box ``data`` covers (map-pixel edges).
    scale, translate : (float, float)
        napari ``scale`` and ``translate`` (world µm, row/col): pixel ``(i, j)``'s *centre*
        lies at ``translate + (i, j) · scale``.
    contrast_limits : (float, float)
        ``(min, max)`` of the map, so its lowest attention renders black (adds nothing under
        additive blending) and its highest at the colormap's top; ``(0, max)`` or ``(0, 1)``
        for a constant map.
    """

    data: np.ndarray
    box: tuple[float, float, float, float]
    scale: tuple[float, float]
    translate: tuple[float, float]
    contrast_limits: tuple[float, float]


def attention_layer_data(
    amap: np.ndarray,
    box: Sequence[float],
    mpp: Sequence[float] | None,
    slide_dims: Sequence[int] | None = None,
) -> AttentionLayerData:
    """Place an attention map covering the level-0 ``box`` on the slide.

    With ``slide_dims`` ``(width, height)``, map pixels whose centres fall outside the slide
    (the black padding of a square frame around a non-square slide) are cropped away; the box
    shrinks to the kept pixels' edges, so the placement stays exact.

    Parameters
    ----------
    amap : np.ndarray
        ``(h, w)`` attention map.
    box : (x0, y0, x1, y1)
        Level-0 box the map covers (map-pixel edges).
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    slide_dims : (width, height), optional
        Level-0 size of the slide, to crop the map to it.

    Returns
    -------
    AttentionLayerData
        The (cropped) map with its box, napari ``scale``/``translate`` and contrast limits.
    """
    data = np.asarray(amap, dtype=np.float32)
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"attention map must be a non-empty 2-D array, got {data.shape}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0) or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"attention box {tuple(box)} is not a finite box with area")
    h, w = data.shape
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    if slide_dims is not None:
        width, height = (float(v) for v in slide_dims)
        j0 = max(math.ceil((0.0 - x0) / sx - 0.5), 0)
        j1 = min(math.floor((width - x0) / sx - 0.5) + 1, w)
        i0 = max(math.ceil((0.0 - y0) / sy - 0.5), 0)
        i1 = min(math.floor((height - y0) / sy - 0.5) + 1, h)
        if j1 > j0 and i1 > i0 and (i0, i1, j0, j1) != (0, h, 0, w):
            data = data[i0:i1, j0:j1]
            x0, x1 = x0 + j0 * sx, x0 + j1 * sx
            y0, y1 = y0 + i0 * sy, y0 + i1 * sy
    mx, my = mpp_or_unit(mpp)
    finite = data[np.isfinite(data)]
    top = float(finite.max()) if finite.size else 0.0
    bottom = float(finite.min()) if finite.size else 0.0
    if top > bottom:
        limits = (bottom, top)
    else:
        limits = (0.0, top if top > 0 else 1.0)
    return AttentionLayerData(
        data=np.ascontiguousarray(data),
        box=(x0, y0, x1, y1),
        scale=(sy * my, sx * mx),
        translate=((y0 + sy / 2.0) * my, (x0 + sx / 2.0) * mx),
        contrast_limits=limits,
    )


def composite_attention(
    maps: Sequence[np.ndarray],
    boxes: np.ndarray,
    mpp: Sequence[float] | None,
    slide_dims: Sequence[int] | None = None,
    max_side: int = 2048,
) -> AttentionLayerData:
    """All attention maps of one magnifying layer as one raster.

    A single map is placed as it is (:func:`attention_layer_data`, raw values). Several maps —
    they overlap: a frozen patch's frame is its parent's — are each cropped to the slide,
    stretched to [0, 1] between their own minimum and maximum (a constant map becomes 0.5),
    resampled (nearest) onto one grid exactly covering the union of their boxes, and combined
    by taking the maximum where they overlap; 0 where no map lies. The grid pixel is about
    the finest map pixel, coarsened when needed so the raster's longer side is at most
    ``max_side``. Contrast limits are then ``(0, 1)``.

    Parameters
    ----------
    maps : sequence of np.ndarray
        The layer's 2-D attention maps.
    boxes : np.ndarray
        ``(M, 4)`` level-0 box of each map.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    slide_dims : (width, height), optional
        Level-0 size of the slide (maps are cropped to it).
    max_side : int
        Longest side of the combined raster, in pixels.

    Returns
    -------
    AttentionLayerData
        One raster and its placement.
    """
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4)
    if not maps or len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} attention maps for {len(boxes)} boxes")
    if len(maps) == 1:
        return attention_layer_data(maps[0], boxes[0], mpp, slide_dims)
    placed = [attention_layer_data(m, b, None, slide_dims) for m, b in zip(maps, boxes)]
    x0 = min(p.box[0] for p in placed)
    y0 = min(p.box[1] for p in placed)
    x1 = max(p.box[2] for p in placed)
    y1 = max(p.box[3] for p in placed)
    finest = min(min(p.scale) for p in placed)  # level-0 px per map pixel (mpp None → 1)
    g = max(finest, max(x1 - x0, y1 - y0) / max(int(max_side), 1))
    cols = max(1, math.ceil((x1 - x0) / g - 1e-9))
    rows = max(1, math.ceil((y1 - y0) / g - 1e-9))
    gx, gy = (x1 - x0) / cols, (y1 - y0) / rows  # the grid covers the union exactly
    out = np.zeros((rows, cols), dtype=np.float32)
    cx = x0 + (np.arange(cols) + 0.5) * gx
    cy = y0 + (np.arange(rows) + 0.5) * gy
    for p in placed:
        d = p.data
        finite = d[np.isfinite(d)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        norm = (np.nan_to_num(d, nan=lo) - lo) / (hi - lo) if hi > lo else np.full_like(d, 0.5)
        bx0, by0, bx1, by1 = p.box
        h, w = d.shape
        c0, c1 = np.searchsorted(cx, bx0, "left"), np.searchsorted(cx, bx1, "left")
        r0, r1 = np.searchsorted(cy, by0, "left"), np.searchsorted(cy, by1, "left")
        if c1 <= c0 or r1 <= r0:
            continue
        jm = np.clip(((cx[c0:c1] - bx0) / ((bx1 - bx0) / w)).astype(int), 0, w - 1)
        im = np.clip(((cy[r0:r1] - by0) / ((by1 - by0) / h)).astype(int), 0, h - 1)
        np.maximum(out[r0:r1, c0:c1], norm[np.ix_(im, jm)], out=out[r0:r1, c0:c1])
    mx, my = mpp_or_unit(mpp)
    return AttentionLayerData(
        data=out,
        box=(x0, y0, x1, y1),
        scale=(gy * my, gx * mx),
        translate=((y0 + gy / 2.0) * my, (x0 + gx / 2.0) * mx),
        contrast_limits=(0.0, 1.0),
    )


def attention_box_from_layer(
    shape: Sequence[int],
    scale: Sequence[float],
    translate: Sequence[float],
    mpp: Sequence[float] | None,
) -> tuple[float, float, float, float]:
    """The level-0 box an attention image layer covers (inverse of :func:`attention_layer_data`).

    Parameters
    ----------
    shape : sequence of int
        The layer's data shape (the last two axes are rows, columns).
    scale, translate : sequence of float
        The layer's napari transform (world µm).
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.

    Returns
    -------
    (x0, y0, x1, y1)
        Level-0 pixels (map-pixel edges).
    """
    mx, my = mpp_or_unit(mpp)
    h, w = int(shape[-2]), int(shape[-1])
    sr, sc = (float(v) for v in list(scale)[-2:])
    tr, tc = (float(v) for v in list(translate)[-2:])
    y0 = (tr - sr / 2.0) / my
    x0 = (tc - sc / 2.0) / mx
    return (x0, y0, x0 + w * sc / mx, y0 + h * sr / my)
