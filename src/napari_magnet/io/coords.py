"""Level-0 pixels ↔ napari world coordinates (DESIGN §2), and reading napari Shapes layers.

The engine and the exporters speak **level-0 pixels (x, y)**; napari speaks **world
coordinates (row, col) in µm**, ``(y · mpp_y, x · mpp_x)``. ``mpp`` arguments are
``(mpp_x, mpp_y)`` in µm per level-0 pixel, as :attr:`Slide.mpp` gives them; ``None`` means the
slide has no physical size and world units are level-0 pixels. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .annotation import rectangle

__all__ = [
    "AREALESS_SHAPE_TYPES",
    "box_to_world_rect",
    "ellipse_polygon",
    "feature_column",
    "is_axis_aligned_rectangle",
    "level0_to_world",
    "mpp_or_unit",
    "shape_outlines",
    "shapes_box_level0",
    "world_to_level0",
]

#: napari shape types without an area: they have no level-0 outline.
AREALESS_SHAPE_TYPES = ("line", "path", "polyline")


def mpp_or_unit(mpp: Sequence[float] | None) -> tuple[float, float]:
    """The slide's µm per pixel, or 1 when it has none.

    Parameters
    ----------
    mpp : (mpp_x, mpp_y) or None
        As :attr:`Slide.mpp` gives it.

    Returns
    -------
    (float, float)
        ``(mpp_x, mpp_y)``, ``(1.0, 1.0)`` for ``None``.

    Raises
    ------
    ValueError
        When the values are not two positive finite numbers.
    """
    if mpp is None:
        return (1.0, 1.0)
    mx, my = (float(v) for v in mpp)
    if not (math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0):
        raise ValueError(f"mpp must be two positive numbers, got {mpp!r}")
    return (mx, my)


def level0_to_world(xy: np.ndarray, mpp: Sequence[float] | None) -> np.ndarray:
    """Level-0 points → napari world coordinates.

    Parameters
    ----------
    xy : np.ndarray
        ``(N, 2)`` level-0 ``(x, y)``.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel (``None``: world units are pixels).

    Returns
    -------
    np.ndarray
        ``(N, 2)`` world ``(row, col)``: ``(y · mpp_y, x · mpp_x)``.
    """
    mx, my = mpp_or_unit(mpp)
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    return np.stack([xy[:, 1] * my, xy[:, 0] * mx], axis=1)


def world_to_level0(
    rc: np.ndarray,
    mpp: Sequence[float] | None,
    scale: Sequence[float] = (1.0, 1.0),
    translate: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """A layer's data coordinates → level-0 points (inverse of :func:`level0_to_world`).

    Parameters
    ----------
    rc : np.ndarray
        ``(N, 2)`` ``(row, col)`` in the layer's data coordinates.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    scale, translate : sequence of float
        The layer's own data → world transform (``data · scale + translate``; rotation,
        shear and affine are not supported).

    Returns
    -------
    np.ndarray
        ``(N, 2)`` level-0 ``(x, y)``.
    """
    mx, my = mpp_or_unit(mpp)
    rc = np.asarray(rc, dtype=float).reshape(-1, 2)
    s = np.asarray(scale, dtype=float)[-2:]
    t = np.asarray(translate, dtype=float)[-2:]
    world = rc * s + t
    return np.stack([world[:, 1] / mx, world[:, 0] / my], axis=1)


def shapes_box_level0(
    vertices: np.ndarray,
    scale: Sequence[float],
    translate: Sequence[float],
    slide_scale: Sequence[float],
    slide_translate: Sequence[float] = (0.0, 0.0),
) -> tuple[float, float, float, float]:
    """Level-0 bounding box of shape vertices given in a layer's data coordinates.

    Parameters
    ----------
    vertices : np.ndarray
        ``(..., D)`` vertices; the last two axes are row, col.
    scale, translate : sequence of float
        The shapes layer's data → world transform.
    slide_scale, slide_translate : sequence of float
        The slide layer's own transform (its data are level-0 ``(row, col)``).

    Returns
    -------
    (x0, y0, x1, y1)
        The box in level-0 pixels.
    """
    v = np.asarray(vertices, dtype=float)
    v = v.reshape(-1, v.shape[-1])[:, -2:]
    world = v * np.asarray(scale, dtype=float)[-2:] + np.asarray(translate, dtype=float)[-2:]
    rc = (world - np.asarray(slide_translate, dtype=float)[-2:]) / np.asarray(
        slide_scale, dtype=float
    )[-2:]
    return (
        float(rc[:, 1].min()),
        float(rc[:, 0].min()),
        float(rc[:, 1].max()),
        float(rc[:, 0].max()),
    )


def box_to_world_rect(box: Sequence[float], mpp: Sequence[float] | None) -> np.ndarray:
    """The napari rectangle of a level-0 box.

    Parameters
    ----------
    box : (x0, y0, x1, y1)
        Level-0 pixels.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.

    Returns
    -------
    np.ndarray
        ``(4, 2)`` world ``(row, col)`` corners: top-left, top-right, bottom-right,
        bottom-left.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    return level0_to_world(rectangle(x0, y0, x1, y1), mpp)


def ellipse_polygon(vertices: np.ndarray, n: int = 64) -> np.ndarray:
    """The polygon of a napari ellipse.

    Parameters
    ----------
    vertices : np.ndarray
        The ellipse's 4 bounding-box corners (an axis-aligned or rotated box).
    n : int
        Number of polygon vertices.

    Returns
    -------
    np.ndarray
        ``(n, 2)`` vertices, in the coordinates of ``vertices``.
    """
    v = np.asarray(vertices, dtype=float).reshape(-1, 2)
    centre = v.mean(axis=0)
    a = (v[1] - v[0]) / 2.0  # half of one side
    b = (v[3] - v[0]) / 2.0  # half of the other
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return centre + np.cos(t)[:, None] * a + np.sin(t)[:, None] * b


def feature_column(features: Any, name: str, n: int, default: Any) -> list:
    """One column of a napari features table, as a list of exactly ``n`` values.

    Parameters
    ----------
    features : DataFrame, dict of columns, or None
        A Shapes layer's ``features``.
    name : str
        The column.
    n : int
        Number of shapes.
    default : Any
        Value of a missing column and of missing trailing rows.

    Returns
    -------
    list
        The column's values (numpy scalars as Python ones when the column has ``tolist``).
    """
    if features is None:
        return [default] * n
    try:
        column = features[name]
    except (KeyError, TypeError, IndexError):
        return [default] * n
    values = list(column.tolist() if hasattr(column, "tolist") else column)
    return (values + [default] * n)[:n]


def is_axis_aligned_rectangle(polygon: np.ndarray) -> bool:
    """Whether a polygon is an axis-aligned rectangle (a napari ``rectangle`` shape).

    Parameters
    ----------
    polygon : np.ndarray
        ``(K, 2)`` vertices.

    Returns
    -------
    bool
        ``True`` for 4 vertices on 2 distinct x and 2 distinct y values (to 1e-9).
    """
    polygon = np.asarray(polygon, dtype=float)
    if len(polygon) != 4:
        return False
    xs, ys = polygon[:, 0], polygon[:, 1]
    return len(np.unique(np.round(xs, 9))) == 2 and len(np.unique(np.round(ys, 9))) == 2


def shape_outlines(
    data: Sequence[np.ndarray],
    shape_types: Sequence[str] | None,
    mpp: Sequence[float] | None,
    scale: Sequence[float] = (1.0, 1.0),
    translate: Sequence[float] = (0.0, 0.0),
) -> tuple[list[np.ndarray], list[int], list[str]]:
    """Level-0 outlines of the area shapes of a Shapes layer.

    Parameters
    ----------
    data : sequence of np.ndarray
        The layer's ``data``: vertices ``(K, D)`` in data coordinates (the last two axes are
        row, col).
    shape_types : sequence of str or None
        The layer's ``shape_type``; ``None``: every shape is a polygon.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    scale, translate : sequence of float
        The layer's data → world transform.

    Returns
    -------
    (outlines, kept, skipped)
        ``(K, 2)`` level-0 ``(x, y)`` outlines of the rectangles and polygons as they are and
        of ellipses as 64-gons; the indices of those shapes in ``data``; and one line
        ("shape i: line") per line or path, which has no area.
    """
    types = list(shape_types) if shape_types is not None else ["polygon"] * len(data)
    outlines: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[str] = []
    for i, (verts, shape_type) in enumerate(zip(data, types)):
        if shape_type in AREALESS_SHAPE_TYPES:
            skipped.append(f"shape {i}: {shape_type}")
            continue
        verts = np.asarray(verts, dtype=float)[:, -2:]
        if shape_type == "ellipse":
            verts = ellipse_polygon(verts)
        outlines.append(world_to_level0(verts, mpp, scale, translate))
        kept.append(i)
    return outlines, kept, skipped
