"""Magnify results and annotations as viewer-layer data (pure numpy; no napari import).

The engine and the exporters speak **level-0 pixels (x, y)**; napari speaks **world
coordinates (row, col) in µm**, ``(y · mpp_y, x · mpp_x)`` (DESIGN §2). This module holds every
conversion between the two, and the computations behind the layers the plugin shows, so they
can be tested without a viewer and reused by the CLI:

* ROI rectangles of a :class:`~napari_magnet.engine.types.MagnifyStep` → rectangle vertices in
  world µm, a features table and lineage colours (:func:`roi_layer_data`);
* attention maps → image data with the napari ``scale``/``translate`` that lays each map on its
  level-0 box (:func:`attention_layer_data`; napari places pixel *centres* at
  ``translate + index · scale``, so ``translate`` is the box's top-left plus half a map pixel);
* the coverage grid: which tissue each magnifying layer looked at, and which it never examined
  (:func:`tissue_mask`, :func:`coverage_map`);
* shapes (world vertices + features) ↔ :class:`~napari_magnet.io.geojson.Annotation`
  (level-0 polygons) for the GeoJSON writer, reader and autosave;
* the review styling of shapes: colours by class and review state.

``mpp`` arguments are ``(mpp_x, mpp_y)`` in µm per level-0 pixel, as :attr:`Slide.mpp` gives
them; ``None`` means the slide has no physical size and world units are level-0 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .geojson import (
    MEASUREMENT_NAMES,
    PROPERTIES_KEY,
    REVIEW_STATES,
    Annotation,
    branch_color,
    class_color,
    rectangle,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine.types import MagnifyStep

__all__ = [
    "ROI_FEATURES",
    "UNEXAMINED",
    "AttentionLayerData",
    "RoiLayerData",
    "annotations_to_shapes",
    "attention_layer_data",
    "composite_attention",
    "step_layer_data",
    "box_to_world_rect",
    "coverage_colors",
    "coverage_grid_shape",
    "coverage_map",
    "coverage_placement",
    "coverage_summary",
    "ellipse_polygon",
    "level0_to_world",
    "mpp_or_unit",
    "resize_mask",
    "review_style",
    "roi_layer_data",
    "shapes_box_level0",
    "shapes_to_annotations",
    "tissue_mask",
    "world_to_level0",
]

#: Columns of the features table of every ROI Shapes layer, in order.
ROI_FEATURES: tuple[str, ...] = ("id", "parent", "layer", "scale", "level", "attention_mass",
                                 "aux_probability", "class", "review")

#: Value of :func:`coverage_map` for tissue no magnifying layer looked at.
UNEXAMINED = 255


def mpp_or_unit(mpp: Sequence[float] | None) -> tuple[float, float]:
    """``(mpp_x, mpp_y)`` as floats, or ``(1, 1)`` when the slide has no mpp."""
    if mpp is None:
        return (1.0, 1.0)
    mx, my = (float(v) for v in mpp)
    if not (math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0):
        raise ValueError(f"mpp must be two positive numbers, got {mpp!r}")
    return (mx, my)


# --------------------------------------------------------------------------------------------
# coordinates
# --------------------------------------------------------------------------------------------


def level0_to_world(xy: np.ndarray, mpp: Sequence[float] | None) -> np.ndarray:
    """Level-0 ``(N, 2)`` points ``(x, y)`` → world ``(N, 2)`` ``(row, col)`` µm."""
    mx, my = mpp_or_unit(mpp)
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return np.stack([xy[:, 1] * my, xy[:, 0] * mx], axis=1)


def world_to_level0(rc: np.ndarray, mpp: Sequence[float] | None,
                    scale: Sequence[float] = (1.0, 1.0),
                    translate: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """Layer data ``(N, 2)`` ``(row, col)`` → level-0 ``(N, 2)`` ``(x, y)``.

    ``scale``/``translate`` are the layer's own (data → world: ``data · scale + translate``;
    rotation, shear and affine are not supported); ``mpp`` the slide's.
    """
    mx, my = mpp_or_unit(mpp)
    rc = np.asarray(rc, dtype=float).reshape(-1, 2)
    s = np.asarray(scale, dtype=float)[-2:]
    t = np.asarray(translate, dtype=float)[-2:]
    world = rc * s + t
    return np.stack([world[:, 1] / mx, world[:, 0] / my], axis=1)


def shapes_box_level0(vertices: np.ndarray, scale: Sequence[float],
                      translate: Sequence[float], slide_scale: Sequence[float],
                      slide_translate: Sequence[float] = (0.0, 0.0)
                      ) -> tuple[float, float, float, float]:
    """Level-0 bounding box ``(x0, y0, x1, y1)`` of shape vertices given in a layer's data
    coordinates: data → world with the layer's ``scale``/``translate``, world → the slide
    layer's level-0 data ``(row, col)`` with the slide layer's own ``scale``/``translate``."""
    v = np.asarray(vertices, dtype=float)
    v = v.reshape(-1, v.shape[-1])[:, -2:]
    world = v * np.asarray(scale, dtype=float)[-2:] + np.asarray(translate, dtype=float)[-2:]
    rc = (world - np.asarray(slide_translate, dtype=float)[-2:]) / np.asarray(
        slide_scale, dtype=float)[-2:]
    return (float(rc[:, 1].min()), float(rc[:, 0].min()), float(rc[:, 1].max()),
            float(rc[:, 0].max()))


def box_to_world_rect(box: Sequence[float], mpp: Sequence[float] | None) -> np.ndarray:
    """Level-0 box ``(x0, y0, x1, y1)`` → the ``(4, 2)`` world ``(row, col)`` corners of a
    napari rectangle (top-left, top-right, bottom-right, bottom-left)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return level0_to_world(rectangle(x0, y0, x1, y1), mpp)


def ellipse_polygon(vertices: np.ndarray, n: int = 64) -> np.ndarray:
    """The ``(n, 2)`` polygon (same coordinates) of a napari ellipse given by its 4 bounding-box
    corners (an axis-aligned or rotated box)."""
    v = np.asarray(vertices, dtype=float).reshape(-1, 2)
    centre = v.mean(axis=0)
    a = (v[1] - v[0]) / 2.0  # half of one side
    b = (v[3] - v[0]) / 2.0  # half of the other
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return centre + np.cos(t)[:, None] * a + np.sin(t)[:, None] * b


# --------------------------------------------------------------------------------------------
# ROIs
# --------------------------------------------------------------------------------------------


def _rgba(rgb: Sequence[int], alpha: float = 1.0) -> np.ndarray:
    return np.array([rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, alpha], dtype=float)


@dataclass
class RoiLayerData:
    """What a Shapes layer of one step's regions needs.

    Attributes
    ----------
    rects : list of np.ndarray
        ``(4, 2)`` world ``(row, col)`` rectangle corners, one per region.
    features : dict of str to list
        Columns :data:`ROI_FEATURES`.
    edge_colors : np.ndarray
        ``(N, 4)`` RGBA in [0, 1], the lineage colour (:func:`branch_color`).
    """

    rects: list[np.ndarray]
    features: dict[str, list]
    edge_colors: np.ndarray


def roi_layer_data(step: MagnifyStep, mpp: Sequence[float] | None) -> RoiLayerData:
    """Rectangles (world µm), features and lineage colours of a step's regions."""
    boxes = np.asarray(step.boxes, dtype=float).reshape(-1, 4)
    n = len(boxes)
    ids = [str(r) for r in step.region_ids]
    if len(ids) != n:
        raise ValueError(f"layer {step.layer}: {len(ids)} region ids for {n} boxes")
    parents = [str(p) for p in (step.parent_ids or [])] + [""] * n
    levels = np.asarray(step.levels).reshape(-1)
    mass = np.asarray(step.attention_mass, dtype=float).reshape(-1)
    scales = np.asarray(step.scales, dtype=float).reshape(-1)
    aux = float(step.aux_probability) if step.aux_probability is not None else float("nan")
    features = {
        "id": ids,
        "parent": parents[:n],
        "layer": [int(step.layer)] * n,
        "scale": [float(v) for v in scales] if len(scales) == n else [float("nan")] * n,
        "level": [int(v) for v in levels] if len(levels) == n else [-1] * n,
        "attention_mass": [float(v) for v in mass] if len(mass) == n else [float("nan")] * n,
        "aux_probability": [aux] * n,
        "class": [""] * n,
        "review": ["unreviewed"] * n,
    }
    colors = np.array([_rgba(branch_color(r)) for r in ids]).reshape(n, 4)
    return RoiLayerData([box_to_world_rect(b, mpp) for b in boxes], features, colors)


def roi_features_from_annotations(annotations: Sequence[Annotation]) -> dict[str, list]:
    """The :data:`ROI_FEATURES` columns of ROIs read back from GeoJSON (our autosave or
    export), using ``properties.napari_magnet`` lineage and the measurements."""
    m = MEASUREMENT_NAMES
    cols: dict[str, list] = {k: [] for k in ROI_FEATURES}
    for a in annotations:
        ours = a.properties.get(PROPERTIES_KEY, {}) if isinstance(a.properties, dict) else {}
        ours = ours if isinstance(ours, dict) else {}
        meas = a.measurements or {}
        cols["id"].append(str(ours.get("region_id", a.name)))
        cols["parent"].append(str(ours.get("parent_id", "")))
        layer = ours.get("layer", meas.get(m["layer"], 0))
        cols["layer"].append(int(layer) if isinstance(layer, (int, float)) else 0)
        cols["scale"].append(float(meas.get(m["scale"], float("nan"))))
        cols["level"].append(int(meas.get(m["level"], -1)))
        cols["attention_mass"].append(float(meas.get(m["attention_mass"], float("nan"))))
        cols["aux_probability"].append(float(meas.get(m["aux_probability"], float("nan"))))
        cols["class"].append(a.classification or "")
        cols["review"].append(a.review if a.review in REVIEW_STATES else "unreviewed")
    return cols


# --------------------------------------------------------------------------------------------
# attention maps
# --------------------------------------------------------------------------------------------


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


def attention_layer_data(amap: np.ndarray, box: Sequence[float], mpp: Sequence[float] | None,
                         slide_dims: Sequence[int] | None = None) -> AttentionLayerData:
    """Place an attention map covering the level-0 ``box`` on the slide.

    With ``slide_dims`` ``(width, height)``, map pixels whose centres fall outside the slide
    (the black padding of a square frame around a non-square slide) are cropped away; the box
    shrinks to the kept pixels' edges, so the placement stays exact.
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


def composite_attention(maps: Sequence[np.ndarray], boxes: np.ndarray,
                        mpp: Sequence[float] | None,
                        slide_dims: Sequence[int] | None = None,
                        max_side: int = 2048) -> AttentionLayerData:
    """All attention maps of one magnifying layer as one raster.

    A single map is placed as it is (:func:`attention_layer_data`, raw values). Several maps —
    they overlap: a frozen patch's frame is its parent's — are each cropped to the slide,
    stretched to [0, 1] between their own minimum and maximum (a constant map becomes 0.5),
    resampled (nearest) onto one grid exactly covering the union of their boxes, and combined
    by taking the maximum where they overlap; 0 where no map lies. The grid pixel is about
    the finest map pixel, coarsened when needed so the raster's longer side is at most
    ``max_side``. Contrast limits are then ``(0, 1)``.
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


@dataclass
class StepLayerData:
    """Everything the viewer shows for one step, computed off the GUI thread."""

    layer: int
    rois: RoiLayerData
    attention: AttentionLayerData
    n_maps: int
    coverage: np.ndarray | None = None


def step_layer_data(step: MagnifyStep, mpp: Sequence[float] | None,
                    slide_dims: Sequence[int], steps_so_far: Sequence[MagnifyStep] = (),
                    tissue: np.ndarray | None = None) -> StepLayerData:
    """ROIs, the composite attention map and the coverage grid (of ``steps_so_far``, which
    should include ``step``; ``tissue`` gives the grid) of one step."""
    coverage = None
    if steps_so_far:
        grid = tissue.shape if tissue is not None else coverage_grid_shape(slide_dims)
        coverage = coverage_map(steps_so_far, slide_dims, tissue, grid)
    return StepLayerData(
        layer=int(step.layer),
        rois=roi_layer_data(step, mpp),
        attention=composite_attention(step.attention_maps, step.attention_boxes, mpp,
                                      slide_dims),
        n_maps=len(step.attention_maps),
        coverage=coverage,
    )


def attention_box_from_layer(shape: Sequence[int], scale: Sequence[float],
                             translate: Sequence[float],
                             mpp: Sequence[float] | None) -> tuple[float, float, float, float]:
    """Inverse of :func:`attention_layer_data`: the level-0 box an image layer of ``shape``
    with napari ``scale``/``translate`` covers."""
    mx, my = mpp_or_unit(mpp)
    h, w = int(shape[-2]), int(shape[-1])
    sr, sc = (float(v) for v in list(scale)[-2:])
    tr, tc = (float(v) for v in list(translate)[-2:])
    y0 = (tr - sr / 2.0) / my
    x0 = (tc - sc / 2.0) / mx
    return (x0, y0, x0 + w * sc / mx, y0 + h * sr / my)


# --------------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------------


def tissue_mask(rgb: np.ndarray, white: int = 215, black: int = 40,
                grey_tolerance: int = 15) -> np.ndarray:
    """Tissue pixels of a low-resolution RGB thumbnail: neither near-white (glass) nor black
    (padding, scanner borders), nor a flat grey (DESIGN §4's grey filter: R, G, B within
    ``grey_tolerance`` of each other and not dark — smudges and out-of-focus glass)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got {rgb.shape}")
    c = rgb[..., :3].astype(np.int16)
    lo, hi = c.min(axis=-1), c.max(axis=-1)
    near_white = lo >= white
    dark = hi <= black
    grey = (hi - lo) < grey_tolerance
    return ~(near_white | dark | grey)


def resize_mask(mask: np.ndarray, shape: Sequence[int], threshold: float = 0.25) -> np.ndarray:
    """Resample a boolean mask to ``shape`` (rows, cols): a cell is True when at least
    ``threshold`` of the mask pixels it covers are (area-weighted on the mask's own grid)."""
    mask = np.asarray(mask, dtype=bool)
    gh, gw = (int(v) for v in shape)
    h, w = mask.shape
    if (h, w) == (gh, gw):
        return mask.copy()
    # which grid cell each mask pixel centre falls into (every pixel counts once)
    rows = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(int), gh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(int), gw - 1)
    cell = (rows[:, None] * gw + cols[None, :]).ravel()
    total = np.bincount(cell, minlength=gh * gw).reshape(gh, gw).astype(float)
    hits = np.bincount(cell, weights=mask.ravel().astype(float),
                       minlength=gh * gw).reshape(gh, gw)
    if (total == 0).any():  # grid finer than the mask: nearest mask pixel
        ri = np.minimum(((np.arange(gh) + 0.5) * h / gh).astype(int), h - 1)
        ci = np.minimum(((np.arange(gw) + 0.5) * w / gw).astype(int), w - 1)
        nearest = mask[np.ix_(ri, ci)]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(total > 0, hits / np.maximum(total, 1), nearest.astype(float))
        return frac >= threshold
    return hits / total >= threshold


def coverage_grid_shape(slide_dims: Sequence[int], max_side: int = 512) -> tuple[int, int]:
    """``(rows, cols)`` of a coverage grid with the slide's aspect and ``max_side`` cells along
    its longer side (at least 1 each)."""
    width, height = (float(v) for v in slide_dims)
    longer = max(width, height)
    rows = max(1, round(height / longer * max_side))
    cols = max(1, round(width / longer * max_side))
    return (int(rows), int(cols))


def coverage_map(steps: Iterable[MagnifyStep], slide_dims: Sequence[int],
                 tissue_mask: np.ndarray | None = None,
                 grid_shape: Sequence[int] | None = None) -> np.ndarray:
    """Which tissue each magnifying layer looked at, on a coarse grid over the slide.

    Parameters
    ----------
    steps : iterable of MagnifyStep
        The run's steps so far.
    slide_dims : (width, height)
        Level-0 size of the slide.
    tissue_mask : np.ndarray, optional
        Boolean tissue mask of the whole slide at any resolution (e.g. :func:`tissue_mask` of
        ``slide.thumbnail(1024)``); resampled to the grid. ``None``: every cell is tissue.
    grid_shape : (rows, cols), optional
        Default: the tissue mask's shape, or :func:`coverage_grid_shape`.

    Returns
    -------
    np.ndarray
        ``(rows, cols)`` uint8: ``k`` (1 … number of layers) on tissue whose cell lies inside a
        region of layer ``k`` and of no deeper layer — the highest magnification that looked
        at it; :data:`UNEXAMINED` (255) on tissue no region covered; ``0`` off tissue. A cell
        is covered by a region when its centre lies inside the region's box; a region smaller
        than a cell still marks the cell holding its centre.
    """
    width, height = (float(v) for v in slide_dims)
    if grid_shape is None:
        grid_shape = (tissue_mask.shape[:2] if tissue_mask is not None
                      else coverage_grid_shape(slide_dims))
    gh, gw = (int(v) for v in grid_shape)
    if gh < 1 or gw < 1 or width <= 0 or height <= 0:
        raise ValueError(f"bad grid {grid_shape} or slide size {slide_dims}")
    depth = np.zeros((gh, gw), dtype=np.uint8)
    cx = (np.arange(gw) + 0.5) * width / gw
    cy = (np.arange(gh) + 0.5) * height / gh
    for step in sorted(steps, key=lambda s: s.layer):
        layer = int(step.layer)
        if not 1 <= layer < UNEXAMINED:
            raise ValueError(f"layer {layer} out of range")
        for x0, y0, x1, y1 in np.asarray(step.boxes, dtype=float).reshape(-1, 4):
            ix = (cx >= x0) & (cx < x1)
            iy = (cy >= y0) & (cy < y1)
            if ix.any() and iy.any():
                depth[np.ix_(iy, ix)] = np.maximum(depth[np.ix_(iy, ix)], layer)
            else:  # smaller than a cell: the cell holding its centre
                j = int(np.clip((x0 + x1) / 2.0 / width * gw, 0, gw - 1))
                i = int(np.clip((y0 + y1) / 2.0 / height * gh, 0, gh - 1))
                depth[i, j] = max(depth[i, j], layer)
    if tissue_mask is None:
        tissue = np.ones((gh, gw), dtype=bool)
    else:
        tissue = resize_mask(tissue_mask, (gh, gw))
    out = np.where(tissue, depth, 0).astype(np.uint8)
    out[tissue & (depth == 0)] = UNEXAMINED
    return out


def coverage_placement(slide_dims: Sequence[int], grid_shape: Sequence[int],
                       mpp: Sequence[float] | None
                       ) -> tuple[tuple[float, float], tuple[float, float]]:
    """napari ``(scale, translate)`` laying a coverage grid over the slide in world µm."""
    width, height = (float(v) for v in slide_dims)
    gh, gw = (int(v) for v in grid_shape)
    mx, my = mpp_or_unit(mpp)
    sr, sc = height / gh * my, width / gw * mx
    return (sr, sc), (sr / 2.0, sc / 2.0)


def coverage_summary(coverage: np.ndarray) -> dict[str, float]:
    """Fractions of the tissue cells: ``examined`` (any layer), ``unexamined``, and
    ``layer_k`` (deepest layer k) for every layer present."""
    cov = np.asarray(coverage)
    tissue = cov > 0
    n = int(tissue.sum())
    out: dict[str, float] = {"tissue_cells": float(n)}
    if n == 0:
        out.update(examined=0.0, unexamined=0.0)
        return out
    out["unexamined"] = float((cov == UNEXAMINED).sum() / n)
    out["examined"] = 1.0 - out["unexamined"]
    for k in sorted(set(np.unique(cov[tissue]).tolist()) - {UNEXAMINED}):
        out[f"layer_{int(k)}"] = float((cov == k).sum() / n)
    return out


def coverage_colors(n_layers: int) -> dict[int, tuple[float, float, float, float]]:
    """RGBA per coverage value: layer 1 … ``n_layers`` from dim blue to bright yellow-green,
    unexamined tissue red, 0 transparent."""
    n = max(int(n_layers), 1)
    stops = np.array([[0.23, 0.30, 0.75], [0.13, 0.57, 0.55], [0.99, 0.91, 0.14]])
    colors: dict[int, tuple[float, float, float, float]] = {0: (0.0, 0.0, 0.0, 0.0)}
    for k in range(1, n + 1):
        t = (k - 1) / max(n - 1, 1)
        pos = t * (len(stops) - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(stops) - 1)
        rgb = stops[lo] + (stops[hi] - stops[lo]) * (pos - lo)
        colors[k] = (float(rgb[0]), float(rgb[1]), float(rgb[2]), 1.0)
    colors[UNEXAMINED] = (0.85, 0.10, 0.10, 1.0)
    return colors


# --------------------------------------------------------------------------------------------
# shapes <-> annotations
# --------------------------------------------------------------------------------------------


@dataclass
class ShapesData:
    """Shapes-layer data built from annotations (world ``(row, col)``)."""

    data: list[np.ndarray]
    shape_types: list[str]
    features: dict[str, list]
    annotations: list[Annotation] = field(default_factory=list)


def _feature_column(features: Any, name: str, n: int, default: Any) -> list:
    if features is None:
        return [default] * n
    try:
        col = features[name]
    except (KeyError, TypeError, IndexError):
        return [default] * n
    values = list(col.tolist() if hasattr(col, "tolist") else col)
    return (values + [default] * n)[:n]


def _is_rectangle(poly: np.ndarray) -> bool:
    if len(poly) != 4:
        return False
    xs, ys = poly[:, 0], poly[:, 1]
    return (len(np.unique(np.round(xs, 9))) == 2 and len(np.unique(np.round(ys, 9))) == 2)


def annotations_to_shapes(annotations: Sequence[Annotation], mpp: Sequence[float] | None,
                          roi: bool = False) -> ShapesData:
    """Annotations (level-0) → Shapes data in world ``(row, col)`` with ``mpp``.

    Axis-aligned 4-corner polygons become ``rectangle`` shapes, others ``polygon`` (holes are
    dropped: napari shapes have none). Features: ``class`` ("" when unclassified), ``review``,
    ``name``; with ``roi=True`` the :data:`ROI_FEATURES` columns instead.
    """
    data, types = [], []
    for a in annotations:
        poly = np.asarray(a.polygon, dtype=float)
        data.append(level0_to_world(poly, mpp))
        types.append("rectangle" if _is_rectangle(poly) else "polygon")
    if roi:
        features = roi_features_from_annotations(annotations)
    else:
        features = {
            "class": [a.classification or "" for a in annotations],
            "review": [a.review if a.review in REVIEW_STATES else "unreviewed"
                       for a in annotations],
            "name": [a.name or "" for a in annotations],
        }
    return ShapesData(data, types, features, list(annotations))


def shapes_to_annotations(
    data: Sequence[np.ndarray],
    shape_types: Sequence[str],
    features: Any,
    mpp: Sequence[float] | None,
    *,
    scale: Sequence[float] = (1.0, 1.0),
    translate: Sequence[float] = (0.0, 0.0),
    kind: str = "annotation",
    slide_name: str = "",
    class_colors: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[Annotation], list[str]]:
    """Shapes-layer content → level-0 :class:`Annotation` polygons for GeoJSON.

    Parameters
    ----------
    data, shape_types
        The layer's ``data`` (vertices in data coordinates) and ``shape_type``.
    features
        The layer's features table (a DataFrame or dict of columns): ``class``, ``review``,
        ``name`` or ``id`` are used when present; for ROI layers (``kind="roi"``) also the
        lineage and measurement columns of :data:`ROI_FEATURES`.
    mpp, scale, translate
        The slide's µm per pixel and the layer's data → world transform.
    kind
        ``"annotation"`` or ``"roi"``, recorded in ``properties.napari_magnet.kind``.

    Returns
    -------
    (annotations, skipped)
        Rectangles and polygons as-is, ellipses as 64-gons; lines and paths have no area and
        are listed in ``skipped`` (as "shape i: line").
    """
    n = len(data)
    classes = _feature_column(features, "class", n, "")
    reviews = _feature_column(features, "review", n, "unreviewed")
    names = _feature_column(features, "name", n, None)
    ids = _feature_column(features, "id", n, None)
    mpp_list = list(mpp_or_unit(mpp)) if mpp is not None else None
    roi_cols = {k: _feature_column(features, k, n, None) for k in ROI_FEATURES}
    m = MEASUREMENT_NAMES
    out: list[Annotation] = []
    skipped: list[str] = []
    for i, (verts, stype) in enumerate(zip(data, shape_types)):
        verts = np.asarray(verts, dtype=float)[:, -2:]
        if stype in ("line", "path", "polyline"):
            skipped.append(f"shape {i}: {stype}")
            continue
        if stype == "ellipse":
            verts = ellipse_polygon(verts)
        poly = world_to_level0(verts, mpp, scale, translate)
        klass = classes[i]
        klass = str(klass) if isinstance(klass, str) and klass else None
        review = reviews[i] if reviews[i] in REVIEW_STATES else "unreviewed"
        name = names[i] if isinstance(names[i], str) else (
            str(ids[i]) if ids[i] is not None and not _isnan(ids[i]) else "")
        ours: dict[str, Any] = {"kind": kind}
        if mpp_list is not None:
            ours["mpp"] = mpp_list
        if slide_name:
            ours["slide"] = slide_name
        measurements: dict[str, float] = {}
        color = None
        if kind == "roi":
            rid = str(roi_cols["id"][i]) if roi_cols["id"][i] is not None else name
            ours.update(region_id=rid,
                        parent_id=str(roi_cols["parent"][i] or ""),
                        layer=_int_or(roi_cols["layer"][i], 0))
            for col, key in (("attention_mass", "attention_mass"), ("scale", "scale"),
                             ("level", "level"), ("layer", "layer"),
                             ("aux_probability", "aux_probability")):
                v = roi_cols[col][i]
                if v is not None and not _isnan(v):
                    measurements[m[key]] = float(v)
            name = rid
            color = branch_color(rid)
        out.append(Annotation(
            polygon=poly,
            name=name,
            classification=klass,
            review=review,
            measurements=measurements,
            properties={PROPERTIES_KEY: ours},
            color=color,
            class_color=(tuple(int(c) for c in class_colors[klass])  # type: ignore[arg-type]
                         if klass and class_colors and klass in class_colors else None),
        ))
    return out, skipped


def _isnan(v: Any) -> bool:
    try:
        return isinstance(v, float) and math.isnan(v)
    except TypeError:
        return False


def _int_or(v: Any, default: int) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return default
    return int(f) if math.isfinite(f) else default


def recorded_mpp(annotations: Sequence[Annotation]) -> tuple[float, float] | None:
    """The ``mpp`` our files record in ``properties.napari_magnet.mpp`` when every annotation
    that records one agrees (``None`` otherwise or when none does)."""
    found: set[tuple[float, float]] = set()
    for a in annotations:
        ours = a.properties.get(PROPERTIES_KEY) if isinstance(a.properties, dict) else None
        mpp = ours.get("mpp") if isinstance(ours, dict) else None
        if mpp is None:
            continue
        try:
            found.add(mpp_or_unit(mpp))
        except (TypeError, ValueError):
            return None
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# review styling
# --------------------------------------------------------------------------------------------

#: Edge colour of rejected shapes.
REJECTED_RGBA = (0.55, 0.55, 0.55, 0.8)
#: Edge width factors by review state.
WIDTH_FACTOR = {"unreviewed": 1.0, "accepted": 2.5, "rejected": 0.5}


def review_style(classes: Sequence[str], reviews: Sequence[str],
                 class_colors: Mapping[str, Sequence[int]] | None = None,
                 base_colors: np.ndarray | None = None, face_alpha: float = 0.15
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge colours, face colours and edge-width factors by class and review state.

    The colour of a shape is its class's (:func:`~napari_magnet.io.geojson.class_color`), or
    ``base_colors[i]`` (ROI lineage colours) when unclassified, or yellow. Accepted shapes are
    drawn bold (×2.5 width), rejected ones thin (×0.5) and grey with no fill; unreviewed ones
    as they are. Faces take the class colour at ``face_alpha`` (transparent when unclassified
    or rejected).
    """
    n = len(classes)
    edges = np.zeros((n, 4))
    faces = np.zeros((n, 4))
    widths = np.ones(n)
    table = {k: tuple(int(c) for c in v) for k, v in (class_colors or {}).items()}
    for i in range(n):
        klass = classes[i] if isinstance(classes[i], str) else ""
        review = reviews[i] if i < len(reviews) and reviews[i] in REVIEW_STATES else "unreviewed"
        if klass:
            rgba = _rgba(class_color(klass, table))  # type: ignore[arg-type]
            faces[i] = (*rgba[:3], face_alpha)
        elif base_colors is not None and i < len(base_colors):
            rgba = np.asarray(base_colors[i], dtype=float)
        else:
            rgba = np.array([1.0, 0.85, 0.0, 1.0])
        if review == "rejected":
            rgba = np.array(REJECTED_RGBA)
            faces[i] = 0.0
        edges[i] = rgba
        widths[i] = WIDTH_FACTOR[review]
    return edges, faces, widths
