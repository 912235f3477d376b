"""napari Shapes-layer content ↔ level-0 :class:`~.annotation.Annotation` records.

The annotations of a slide (drawn, imported, autosaved) live in Shapes layers in world
``(row, col)`` µm with a features table of ``class`` (``""`` = unclassified), ``review`` and
``name``; the GeoJSON writer and reader speak level-0 ``(x, y)`` (DESIGN §2). ROI layers go
through :class:`~.rois.RoiTable`, which :func:`shapes_to_annotations` uses for ``kind="roi"``.
Pure numpy; no napari import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .annotation import PROPERTIES_KEY, REVIEW_STATES, Annotation
from .coords import (
    AREALESS_SHAPE_TYPES,
    feature_column,
    is_axis_aligned_rectangle,
    level0_to_world,
    mpp_or_unit,
    shape_outlines,
)
from .rois import RoiTable

__all__ = [
    "ShapesData",
    "annotations_to_shapes",
    "recorded_mpp",
    "shapes_to_annotations",
]


@dataclass
class ShapesData:
    """Shapes-layer data built from annotations.

    Attributes
    ----------
    data : list of np.ndarray
        ``(K, 2)`` world ``(row, col)`` vertices per shape.
    shape_types : list of str
        ``"rectangle"`` or ``"polygon"`` per shape.
    features : dict of str to list
        Columns ``class``, ``review``, ``name``.
    annotations : list of Annotation
        The annotations the shapes came from.
    """

    data: list[np.ndarray]
    shape_types: list[str]
    features: dict[str, list]
    annotations: list[Annotation] = field(default_factory=list)


def annotations_to_shapes(
    annotations: Sequence[Annotation], mpp: Sequence[float] | None
) -> ShapesData:
    """Level-0 annotations → Shapes-layer data in world ``(row, col)``.

    Parameters
    ----------
    annotations : sequence of Annotation
        The annotations (ROIs read back from a file go through
        :meth:`~.rois.RoiTable.from_annotations` instead).
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel (``None``: world units are level-0 pixels).

    Returns
    -------
    ShapesData
        Axis-aligned 4-corner polygons as ``rectangle`` shapes, others as ``polygon`` (holes
        are dropped: napari shapes have none); features ``class`` (``""`` when
        unclassified), ``review`` and ``name``.
    """
    data, types = [], []
    for a in annotations:
        polygon = np.asarray(a.polygon, dtype=float)
        data.append(level0_to_world(polygon, mpp))
        types.append("rectangle" if is_axis_aligned_rectangle(polygon) else "polygon")
    features = {
        "class": [a.classification or "" for a in annotations],
        "review": [a.review if a.review in REVIEW_STATES else "unreviewed" for a in annotations],
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
    """Shapes-layer content → level-0 :class:`~.annotation.Annotation` polygons for GeoJSON.

    Parameters
    ----------
    data, shape_types
        The layer's ``data`` (vertices in data coordinates) and ``shape_type``.
    features
        The layer's features table (a DataFrame or dict of columns): ``class``, ``review``,
        ``name`` or ``id`` are used when present; an ROI layer's (``kind="roi"``) is read by
        :meth:`~.rois.RoiTable.from_layer`.
    mpp, scale, translate
        The slide's µm per pixel and the layer's data → world transform.
    kind : str
        ``"annotation"`` or ``"roi"``, recorded in ``properties.napari_magnet.kind`` (with the
        ``mpp``, when known, and ``slide_name``, when given).
    slide_name : str
        The slide's file name.
    class_colors : mapping of str to (r, g, b), optional
        Colour of each class, pinned on the annotations of that class.

    Returns
    -------
    (annotations, skipped)
        Rectangles and polygons as they are, ellipses as 64-gons; lines and paths have no
        area and are listed in ``skipped`` (as "shape i: line").
    """
    if kind == "roi":
        table = RoiTable.from_layer(
            data,
            features,
            mpp,
            shape_types=shape_types,
            scale=scale,
            translate=translate,
            slide_name=slide_name,
        )
        skipped = [
            f"shape {i}: {shape_type}"
            for i, shape_type in enumerate(shape_types)
            if shape_type in AREALESS_SHAPE_TYPES
        ]
        return table.to_annotations(mpp=mpp, mark_as_roi=True, class_colors=class_colors), skipped
    outlines, kept, skipped = shape_outlines(data, shape_types, mpp, scale, translate)
    n = len(data)
    classes = feature_column(features, "class", n, "")
    reviews = feature_column(features, "review", n, "unreviewed")
    names = feature_column(features, "name", n, None)
    ids = feature_column(features, "id", n, None)
    ours: dict[str, Any] = {"kind": kind}
    if mpp is not None:
        ours["mpp"] = list(mpp_or_unit(mpp))
    if slide_name:
        ours["slide"] = slide_name
    out: list[Annotation] = []
    for i, polygon in zip(kept, outlines):
        klass = classes[i] if isinstance(classes[i], str) and classes[i] else None
        name = (
            names[i]
            if isinstance(names[i], str)
            else (
                ""
                if ids[i] is None or (isinstance(ids[i], float) and np.isnan(ids[i]))
                else str(ids[i])
            )
        )
        out.append(
            Annotation(
                polygon=polygon,
                name=name,
                classification=klass,
                review=reviews[i] if reviews[i] in REVIEW_STATES else "unreviewed",
                properties={PROPERTIES_KEY: dict(ours)},
                class_color=(
                    tuple(int(c) for c in class_colors[klass])  # type: ignore[arg-type]
                    if klass and class_colors and klass in class_colors
                    else None
                ),
            )
        )
    return out, skipped


def recorded_mpp(annotations: Sequence[Annotation]) -> tuple[float, float] | None:
    """The slide mpp our GeoJSON files record.

    Parameters
    ----------
    annotations : sequence of Annotation
        As read from a file.

    Returns
    -------
    (mpp_x, mpp_y) or None
        The ``properties.napari_magnet.mpp`` every annotation that records one agrees on;
        ``None`` when they disagree, one is invalid, or none records it.
    """
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
