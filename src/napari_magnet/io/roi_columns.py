"""How ROIs are encoded outside a :class:`~.rois.RoiTable`, and reading their columns back.

GeoJSON encoding of one ROI (see :mod:`.geojson` for the format): its outline (the box as a
4-corner rectangle), ``name`` = the lineage id, ``color`` = :func:`~.colors.branch_color`,
the class and review state, ``measurements`` named by :data:`MEASUREMENT_NAMES` (only known
values: attention mass, scale, level, layer, aux probability, slide probability) and
``properties.napari_magnet`` = ``{"slide", "region_id", "parent_id", "layer"}``, plus
``"kind": "roi"`` and the slide's ``"mpp"`` when asked (that is how the viewer's files mark
ROIs, so the autosave and our reader bring them back as ROIs, in µm).

Shapes-layer encoding: rectangles in world ``(row, col)`` µm and a features table with the
columns :data:`ROI_FEATURES`; unknown numbers are NaN, an unknown level is ``-1``. Each ROI is
labelled with its id: the label sits at a corner of its box that depends on the magnifying
layer (:data:`LABEL_ANCHORS`, so a frozen patch's label does not cover its parent's), in a
size that shrinks with depth (:func:`label_size`); :func:`label_layout` picks the labels that
fit on screen at a zoom, and :func:`roi_description` is what hovering an ROI shows.

:func:`roi_columns_from_annotations` and :func:`roi_columns_from_layer` read either encoding
back into the columns a :class:`~.rois.RoiTable` is made of.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .annotation import PROPERTIES_KEY, REVIEW_STATES, Annotation
from .coords import feature_column, shape_outlines

__all__ = [
    "LABEL_ANCHORS",
    "MEASUREMENT_NAMES",
    "MIN_LABEL_SIDE_PX",
    "ROI_FEATURES",
    "UNKNOWN_LEVEL",
    "RoiLayerData",
    "label_anchor",
    "label_layout",
    "label_size",
    "roi_columns_from_annotations",
    "roi_columns_from_layer",
    "roi_description",
]


#: GeoJSON measurement name of each ROI number (QuPath's measurement table).
MEASUREMENT_NAMES: dict[str, str] = {
    "attention_mass": "Attention mass",
    "scale": "Scale",
    "level": "Level",
    "layer": "Layer",
    "aux_probability": "Aux probability",
    "probability": "Probability",
}

#: Columns of the features table of every ROI Shapes layer, in order.
ROI_FEATURES: tuple[str, ...] = (
    "id",
    "parent",
    "layer",
    "scale",
    "level",
    "attention_mass",
    "aux_probability",
    "probability",
    "class",
    "review",
)

#: Pyramid level of an ROI whose level is not known.
UNKNOWN_LEVEL = -1

_NAN = float("nan")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _int_or(value: Any, default: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return int(f) if math.isfinite(f) else default


def _float_or_nan(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return _NAN
    try:
        return float(value)
    except (TypeError, ValueError):
        return _NAN


@dataclass
class RoiLayerData:
    """What a Shapes layer of ROIs needs (world coordinates, napari's conventions).

    Attributes
    ----------
    rects : list of np.ndarray
        ``(4, 2)`` world ``(row, col)`` rectangle corners (or the outline of an ROI that is no
        longer a rectangle), one per ROI.
    features : dict of str to list
        Columns :data:`ROI_FEATURES`.
    edge_colors : np.ndarray
        ``(N, 4)`` RGBA in [0, 1], the lineage colour (:func:`~.colors.branch_color`).
    shape_types : list of str
        ``"rectangle"`` for axis-aligned 4-corner outlines, else ``"polygon"``.
    """

    rects: list[np.ndarray]
    features: dict[str, list]
    edge_colors: np.ndarray
    shape_types: list[str] = dataclasses.field(default_factory=list)


def roi_columns_from_annotations(annotations: Sequence[Annotation]) -> dict[str, Any]:
    """The columns of ROIs read back from GeoJSON (our export or autosave).

    Parameters
    ----------
    annotations : sequence of Annotation
        One per ROI. The lineage comes from ``properties.napari_magnet`` (``region_id``,
        ``parent_id``, ``layer``; the name when there is no ``region_id``), the numbers
        from the measurements; outlines, feature ids, classes and review states are kept.

    Returns
    -------
    dict of str to Any
        The keyword arguments of :class:`~.rois.RoiTable`, one entry per ROI in each column;
        ``slide_name`` is the slide every annotation records, if they agree.
    """
    m = MEASUREMENT_NAMES
    rows: dict[str, list] = {
        k: []
        for k in (
            "ids",
            "parent_ids",
            "layers",
            "levels",
            "scales",
            "attention_mass",
            "aux_probability",
            "probability",
            "classes",
            "reviews",
        )
    }
    slides: set[Any] = set()
    for a in annotations:
        ours = a.properties.get(PROPERTIES_KEY, {}) if isinstance(a.properties, dict) else {}
        ours = ours if isinstance(ours, dict) else {}
        meas = a.measurements or {}
        slides.add(ours.get("slide"))
        rows["ids"].append(str(ours.get("region_id", a.name)))
        rows["parent_ids"].append(str(ours.get("parent_id", "")))
        layer = ours.get("layer", meas.get(m["layer"], 0))
        rows["layers"].append(int(layer) if isinstance(layer, (int, float)) else 0)
        rows["levels"].append(int(meas.get(m["level"], UNKNOWN_LEVEL)))
        for column in ("scale", "attention_mass", "aux_probability", "probability"):
            key = "scales" if column == "scale" else column
            rows[key].append(float(meas.get(m[column], _NAN)))
        rows["classes"].append(a.classification or "")
        rows["reviews"].append(a.review if a.review in REVIEW_STATES else "unreviewed")
    outlines = [np.asarray(a.polygon, dtype=float) for a in annotations]
    slide = slides.pop() if len(slides) == 1 else None
    return dict(
        **rows,
        boxes=[a.bbox for a in annotations],
        outlines=outlines,
        feature_ids=[a.id for a in annotations],
        slide_name=slide if isinstance(slide, str) else None,
    )


def roi_columns_from_layer(
    data: Sequence[np.ndarray],
    features: Any,
    mpp: Sequence[float] | None,
    *,
    shape_types: Sequence[str] | None = None,
    scale: Sequence[float] = (1.0, 1.0),
    translate: Sequence[float] = (0.0, 0.0),
    slide_name: str | None = None,
) -> dict[str, Any]:
    """The columns of the ROIs of a napari Shapes layer.

    Parameters
    ----------
    data : sequence of np.ndarray
        The layer's ``data``: vertices in its data coordinates, ``(row, col)``.
    features : DataFrame or dict of columns
        The layer's features table: the :data:`ROI_FEATURES` columns that are present
        (the lineage id falls back on a ``name`` column; missing numbers are unknown).
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    shape_types : sequence of str, optional
        The layer's ``shape_type`` (default: every shape is a polygon). Ellipses become
        64-gons; lines and paths have no area and are left out.
    scale, translate : sequence of float
        The layer's data → world transform.
    slide_name : str, optional
        The slide file name to record (``""`` or ``None``: none).

    Returns
    -------
    dict of str to Any
        The keyword arguments of :class:`~.rois.RoiTable`: one row per area shape, its
        level-0 outline kept exactly.
    """
    outlines, kept, _ = shape_outlines(data, shape_types, mpp, scale, translate)
    n = len(data)
    column = {k: feature_column(features, k, n, None) for k in (*ROI_FEATURES, "name")}
    rows: dict[str, list] = {
        k: []
        for k in (
            "ids",
            "parent_ids",
            "layers",
            "levels",
            "scales",
            "attention_mass",
            "aux_probability",
            "probability",
            "classes",
            "reviews",
        )
    }
    for i in kept:
        rid, name = column["id"][i], column["name"][i]
        if _is_missing(rid):
            rid = name if isinstance(name, str) else ""
        parent = column["parent"][i]
        klass = column["class"][i]
        review = column["review"][i]
        rows["ids"].append(str(rid))
        rows["parent_ids"].append("" if _is_missing(parent) else str(parent))
        rows["layers"].append(_int_or(column["layer"][i], 0))
        rows["levels"].append(_int_or(column["level"][i], UNKNOWN_LEVEL))
        rows["scales"].append(_float_or_nan(column["scale"][i]))
        rows["attention_mass"].append(_float_or_nan(column["attention_mass"][i]))
        rows["aux_probability"].append(_float_or_nan(column["aux_probability"][i]))
        rows["probability"].append(_float_or_nan(column["probability"][i]))
        rows["classes"].append(klass if isinstance(klass, str) else "")
        rows["reviews"].append(review if review in REVIEW_STATES else "unreviewed")
    return dict(
        **rows,
        boxes=[(o[:, 0].min(), o[:, 1].min(), o[:, 0].max(), o[:, 1].max()) for o in outlines],
        outlines=outlines,
        feature_ids=[None] * len(kept),
        slide_name=slide_name or None,
    )


# --------------------------------------------------------------------------------------------
# labels and hover text of an ROI layer
# --------------------------------------------------------------------------------------------

#: napari text anchor of the ROI labels of magnifying layer 1, 2, 3, 4 (then again). napari
#: draws an ``upper_*`` label just above the box and a ``lower_*`` one just below it, flush
#: with its left or right edge: each layer labels another corner, so a child whose box is its
#: parent's (the frozen patch) or shares a corner with it does not print over the parent's.
LABEL_ANCHORS: tuple[str, ...] = ("upper_left", "lower_right", "upper_right", "lower_left")

#: Labels of ROIs narrower than this on screen (canvas pixels) are hidden.
MIN_LABEL_SIDE_PX = 18.0

_PX_PER_PT = 4.0 / 3.0  # font points → canvas pixels at 96 dpi
_CHAR_WIDTH = 0.62  # average glyph advance, in font sizes
_LINE_HEIGHT = 1.25


def label_anchor(layer_no: int) -> str:
    """The napari text anchor of the labels of a magnifying layer's ROIs.

    Parameters
    ----------
    layer_no : int
        The 1-based magnifying layer (0 or less: unknown, labelled like layer 1).

    Returns
    -------
    str
        One of :data:`LABEL_ANCHORS`.
    """
    return LABEL_ANCHORS[(max(int(layer_no), 1) - 1) % len(LABEL_ANCHORS)]


def label_size(layer_no: int) -> float:
    """The font size (points) of a magnifying layer's ROI labels.

    Parameters
    ----------
    layer_no : int
        The 1-based magnifying layer.

    Returns
    -------
    float
        12 for layer 1, 1.5 less per layer below it, never under 7.5.
    """
    return max(12.0 - 1.5 * (max(int(layer_no), 1) - 1), 7.5)


def label_layout(
    boxes: np.ndarray,
    anchors: Sequence[str],
    sizes: Sequence[float],
    texts: Sequence[str],
    zoom: float,
    min_side_px: float = MIN_LABEL_SIDE_PX,
) -> np.ndarray:
    """Which ROI labels to show at a zoom so that none prints over another.

    Parameters
    ----------
    boxes : np.ndarray
        ``(N, 4)`` world boxes ``(row0, col0, row1, col1)`` of the ROIs, in priority order
        (the first label that fits wins: callers pass shallower layers and larger ROIs
        first).
    anchors : sequence of str
        Each label's napari anchor: ``upper_*`` labels lie just above the box, ``lower_*``
        ones just below it, flush with its ``*_left`` or ``*_right`` edge (as napari draws
        them).
    sizes : sequence of float
        Each label's font size in points.
    texts : sequence of str
        The labels.
    zoom : float
        Canvas pixels per world unit (napari's ``camera.zoom``).
    min_side_px : float
        Labels of ROIs whose shorter side is under this on screen are hidden.

    Returns
    -------
    np.ndarray
        ``(N,)`` bool, True where the label is shown: its ROI is large enough on screen and
        the label's box (estimated from the text length and size) overlaps no label shown
        before it.
    """
    boxes = np.asarray(boxes, dtype=float).reshape(-1, 4) * float(zoom)
    shown = np.zeros(len(boxes), dtype=bool)
    placed: list[tuple[float, float, float, float]] = []
    for i, (r0, c0, r1, c1) in enumerate(boxes):
        px = float(sizes[i]) * _PX_PER_PT
        w, h = _CHAR_WIDTH * px * max(len(str(texts[i])), 1), _LINE_HEIGHT * px
        if min(r1 - r0, c1 - c0) < max(min_side_px, h):
            continue
        anchor = str(anchors[i])
        top = r1 if anchor.startswith("lower") else r0 - h
        left = c1 - w if anchor.endswith("right") else c0
        rect = (top, left, top + h, left + w)
        if any(
            rect[0] < q[2] and q[0] < rect[2] and rect[1] < q[3] and q[1] < rect[3] for q in placed
        ):
            continue
        placed.append(rect)
        shown[i] = True
    return shown


def _finite(value: Any) -> float | None:
    f = _float_or_nan(value)
    return f if math.isfinite(f) else None


def roi_description(row: Any) -> str:
    """What hovering an ROI shows: its id, layer, attention mass, pyramid level, probability.

    Parameters
    ----------
    row : mapping
        One row of an ROI layer's features (:data:`ROI_FEATURES`; missing entries are
        left out).

    Returns
    -------
    str
        E.g. ``"ROI 1.2.3 · layer 3 · attention mass 0.124 · pyramid level 0 · p = 0.51
        · aux p = 0.61 · Tumor, accepted"``.
    """
    get = row.get if hasattr(row, "get") else (lambda k, d=None: d)
    parts = [f"ROI {get('id', '?')}"]
    layer = _int_or(get("layer"), 0)
    if layer >= 1:
        parts.append(f"layer {layer}")
    mass = _finite(get("attention_mass"))
    if mass is not None:
        parts.append(f"attention mass {mass:.3g}")
    level = _int_or(get("level"), UNKNOWN_LEVEL)
    if level >= 0:
        parts.append(f"pyramid level {level}")
    for key, name in (("probability", "p"), ("aux_probability", "aux p")):
        value = _finite(get(key))
        if value is not None:
            parts.append(f"{name} = {value:.2f}")
    klass = get("class")
    review = get("review")
    state = [str(klass)] if isinstance(klass, str) and klass else []
    if isinstance(review, str) and review in REVIEW_STATES and review != "unreviewed":
        state.append(review)
    if state:
        parts.append(", ".join(state))
    return " · ".join(parts)
