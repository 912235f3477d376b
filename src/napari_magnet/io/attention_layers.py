"""Attention maps placed on the slide as napari image data (pure numpy; no napari import).

napari places pixel *centres* at ``translate + index · scale``, so the ``translate`` of a map
covering a level-0 box is the box's top-left plus half a map pixel, in world µm (DESIGN §2).

What an attention layer shows
-----------------------------
A model's attention map is a probability distribution over its cells, and in a trained model a
very peaked one (entmax: a few dozen of 3,136 cells carry all the mass, the top one 100–1000
times the uniform share). Stretched linearly between its minimum and maximum, only the top cell
or two get a visible colour. The layers therefore show each map's **attention mass rank**
(:func:`attention_mass_rank`): a cell's value is the share of the map's attention held by the
cells attended *no more* than it — 1 for the most attended cell, and the cells above 0.1
together hold 90 % of the map's attention. Cells attended no more than the uniform share (the
map's mean) get 0: they are not where the model looked, and a near-uniform map (an untrained
model's) shows only its above-average cells. The scale is the same for every map and every
layer, so one colour bar reads them all. The mass is taken over the whole map (attention the
model spent on the black padding around a non-square slide counts), then the map is cut
exactly to the slide.
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
    "attention_mass_rank",
    "clip_to_slide",
    "composite_attention",
    "is_mass_rank",
]


@dataclass
class AttentionLayerData:
    """An attention map placed on the slide.

    Attributes
    ----------
    data : np.ndarray
        ``(h, w)`` float32 map (cut to the slide when asked): the attention mass rank
        (:func:`attention_mass_rank`), or the raw values with ``mass_rank=False``.
    box : (x0, y0, x1, y1)
        Level-0 box ``data`` covers (map-pixel edges).
    scale, translate : (float, float)
        napari ``scale`` and ``translate`` (world µm, row/col): pixel ``(i, j)``'s *centre*
        lies at ``translate + (i, j) · scale``.
    contrast_limits : (float, float)
        ``(0, 1)`` for a mass rank; for raw values ``(min, max)`` of the map (``(0, max)`` or
        ``(0, 1)`` for a constant map).
    """

    data: np.ndarray
    box: tuple[float, float, float, float]
    scale: tuple[float, float]
    translate: tuple[float, float]
    contrast_limits: tuple[float, float]


def attention_mass_rank(amap: np.ndarray) -> np.ndarray:
    """Each cell's share of the map's attention held by cells attended no more than it.

    Parameters
    ----------
    amap : np.ndarray
        Attention map, any shape. NaNs carry no attention; a map with negative values (not a
        probability map: logits, say) is shifted so its minimum is 0.

    Returns
    -------
    np.ndarray
        float32, same shape, in [0, 1]: ``sum(a[a <= a_i]) / sum(a)`` for cells attended
        more than the uniform share (the map's mean), 0 for the others. The most attended
        cell(s) get exactly 1 (unless the map is uniform), cells with no attention 0; a
        uniform map, or one without any attention, is 0 everywhere (the model looked nowhere
        in particular). The transform is invariant to the map's scale.
    """
    a = np.asarray(amap, dtype=np.float64)
    out = np.zeros(a.shape, dtype=np.float32)
    finite = np.isfinite(a)
    if not finite.any():
        return out
    values = a[finite]
    low = values.min()
    if low < 0:
        values = values - low
    order = np.sort(values)
    cumulative = np.cumsum(order)
    total = cumulative[-1]
    if not total > 0:
        return out
    last = np.searchsorted(order, values, side="right") - 1  # the last cell <= each value
    rank = np.clip(cumulative[last] / total, 0.0, 1.0)
    # no more than the uniform share (the mean, up to rounding): not where the model looked
    rank[values <= total / len(values) * (1 + 1e-6)] = 0.0
    out[finite] = rank
    return out


def is_mass_rank(data: np.ndarray) -> bool:
    """Whether a raster already holds display values (a mass rank or a combination of them).

    Parameters
    ----------
    data : np.ndarray
        A raster.

    Returns
    -------
    bool
        True when every finite value lies in [0, 1] and the maximum is exactly 1 (the top
        cell of any mass rank). A raw probability map meets this only when one cell holds
        all the attention, and then its mass rank is itself.
    """
    values = np.asarray(data)
    values = values[np.isfinite(values)]
    return bool(values.size) and float(values.min()) >= 0.0 and float(values.max()) == 1.0


def clip_to_slide(
    data: np.ndarray, box: Sequence[float], slide_dims: Sequence[int]
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Cut a map exactly to the slide.

    Parameters
    ----------
    data : np.ndarray
        ``(h, w)`` map covering ``box``.
    box : (x0, y0, x1, y1)
        Level-0 box of the map (pixel edges).
    slide_dims : (width, height)
        Level-0 size of the slide.

    Returns
    -------
    (data, box)
        A map whose box is ``box`` ∩ the slide: resampled (nearest, each new cell takes the
        map cell under its centre) onto a grid of about the same cell size that covers that
        box exactly, so no cell reaches past the slide's edge. The map itself when it lies on
        the slide, or when it does not overlap the slide at all.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = (float(v) for v in slide_dims)
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    if not (cx1 > cx0 and cy1 > cy0) or (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):
        return data, (x0, y0, x1, y1)
    h, w = data.shape
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    cols = max(1, round((cx1 - cx0) / sx))
    rows = max(1, round((cy1 - cy0) / sy))
    centres_x = cx0 + (np.arange(cols) + 0.5) * (cx1 - cx0) / cols
    centres_y = cy0 + (np.arange(rows) + 0.5) * (cy1 - cy0) / rows
    j = np.clip(np.floor((centres_x - x0) / sx).astype(int), 0, w - 1)
    i = np.clip(np.floor((centres_y - y0) / sy).astype(int), 0, h - 1)
    return data[np.ix_(i, j)], (cx0, cy0, cx1, cy1)


def _placement(
    data: np.ndarray, box: Sequence[float], mpp: Sequence[float] | None
) -> tuple[tuple[float, float], tuple[float, float]]:
    x0, y0, x1, y1 = box
    h, w = data.shape
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    mx, my = mpp_or_unit(mpp)
    return (sy * my, sx * mx), ((y0 + sy / 2.0) * my, (x0 + sx / 2.0) * mx)


def _raw_limits(data: np.ndarray) -> tuple[float, float]:
    finite = data[np.isfinite(data)]
    top = float(finite.max()) if finite.size else 0.0
    bottom = float(finite.min()) if finite.size else 0.0
    if top > bottom:
        return (bottom, top)
    return (0.0, top if top > 0 else 1.0)


def attention_layer_data(
    amap: np.ndarray,
    box: Sequence[float],
    mpp: Sequence[float] | None,
    slide_dims: Sequence[int] | None = None,
    *,
    mass_rank: bool = True,
) -> AttentionLayerData:
    """Place an attention map covering the level-0 ``box`` on the slide.

    Parameters
    ----------
    amap : np.ndarray
        ``(h, w)`` attention map.
    box : (x0, y0, x1, y1)
        Level-0 box the map covers (map-pixel edges).
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    slide_dims : (width, height), optional
        Level-0 size of the slide: the map is cut exactly to it (:func:`clip_to_slide`).
    mass_rank : bool
        Show the map's attention mass rank (:func:`attention_mass_rank`, computed over the
        whole map before the cut), unless the map already holds display values
        (:func:`is_mass_rank`: a layer written to a file and read back); else the raw
        values.

    Returns
    -------
    AttentionLayerData
        The map with its box, napari ``scale``/``translate`` and contrast limits.
    """
    data = np.asarray(amap, dtype=np.float32)
    if data.ndim != 2 or data.size == 0:
        raise ValueError(f"attention map must be a non-empty 2-D array, got {data.shape}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0) or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"attention box {tuple(box)} is not a finite box with area")
    if mass_rank and not is_mass_rank(data):
        data = attention_mass_rank(data)
    placed_box = (x0, y0, x1, y1)
    if slide_dims is not None:
        data, placed_box = clip_to_slide(data, placed_box, slide_dims)
    scale, translate = _placement(data, placed_box, mpp)
    return AttentionLayerData(
        data=np.ascontiguousarray(data, dtype=np.float32),
        box=placed_box,
        scale=scale,
        translate=translate,
        contrast_limits=(0.0, 1.0) if mass_rank else _raw_limits(data),
    )


def composite_attention(
    maps: Sequence[np.ndarray],
    boxes: np.ndarray,
    mpp: Sequence[float] | None,
    slide_dims: Sequence[int] | None = None,
    max_side: int = 2048,
) -> AttentionLayerData:
    """All attention maps of one magnifying layer as one raster of attention mass rank.

    A single map is placed as it is (:func:`attention_layer_data`). Several maps — they
    overlap: a frozen patch's frame is its parent's — are each turned into their mass rank,
    cut to the slide, resampled (nearest) onto one grid exactly covering the union of their
    boxes, and combined by taking the maximum where they overlap; 0 where no map lies. The
    grid pixel is about the finest map pixel, coarsened when needed so the raster's longer
    side is at most ``max_side``.

    Parameters
    ----------
    maps : sequence of np.ndarray
        The layer's 2-D attention maps.
    boxes : np.ndarray
        ``(M, 4)`` level-0 box of each map.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    slide_dims : (width, height), optional
        Level-0 size of the slide (maps are cut to it).
    max_side : int
        Longest side of the combined raster, in pixels.

    Returns
    -------
    AttentionLayerData
        One raster, contrast limits ``(0, 1)``, and its placement.
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
        d = np.nan_to_num(p.data, nan=0.0)
        bx0, by0, bx1, by1 = p.box
        h, w = d.shape
        c0, c1 = np.searchsorted(cx, bx0, "left"), np.searchsorted(cx, bx1, "left")
        r0, r1 = np.searchsorted(cy, by0, "left"), np.searchsorted(cy, by1, "left")
        if c1 <= c0 or r1 <= r0:
            continue
        jm = np.clip(((cx[c0:c1] - bx0) / ((bx1 - bx0) / w)).astype(int), 0, w - 1)
        im = np.clip(((cy[r0:r1] - by0) / ((by1 - by0) / h)).astype(int), 0, h - 1)
        np.maximum(out[r0:r1, c0:c1], d[np.ix_(im, jm)], out=out[r0:r1, c0:c1])
    scale, translate = _placement(out, (x0, y0, x1, y1), mpp)
    return AttentionLayerData(
        data=out, box=(x0, y0, x1, y1), scale=scale, translate=translate, contrast_limits=(0.0, 1.0)
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
