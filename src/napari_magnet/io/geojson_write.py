"""Writing QuPath-compatible GeoJSON: annotations → Features → a file (DESIGN §8).

The format (keys, units, our namespaced properties) is described in :mod:`.geojson`. Files are
written atomically (:func:`~.atomic.atomic_write_text`), one feature per line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .annotation import (
    FEATURE_ID_NAMESPACE,
    PROPERTIES_KEY,
    REVIEW_STATES,
    Annotation,
    GeoJSONError,
    has_three_distinct_points,
)
from .atomic import atomic_write_text, json_safe
from .colors import class_color

__all__ = ["annotation_to_feature", "annotations_to_feature_collection", "write_geojson"]


def _rgb(value: Any, what: str) -> list[int]:
    try:
        rgb = [int(v) for v in value]
    except (TypeError, ValueError) as exc:
        raise GeoJSONError(f"{what}: colour {value!r} is not an (r, g, b) triple") from exc
    if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
        raise GeoJSONError(f"{what}: colour {value!r} is not an (r, g, b) triple in 0..255")
    return rgb


def _ring_for_output(ring: Any, what: str) -> list[list[float]]:
    arr = np.asarray(ring, dtype=float)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise GeoJSONError(f"{what}: polygon must be a (K, 2) array, got shape {arr.shape}")
    arr = arr[:, :2]
    if not np.all(np.isfinite(arr)):
        raise GeoJSONError(f"{what}: polygon has non-finite coordinates")
    if len(arr) > 1 and np.array_equal(arr[0], arr[-1]):
        arr = arr[:-1]
    if not has_three_distinct_points(arr):
        raise GeoJSONError(f"{what}: polygon needs at least 3 distinct points")
    return np.vstack([arr, arr[:1]]).tolist()


def _feature_id(annotation: Annotation, index: int) -> str:
    if annotation.id:
        try:
            return str(uuid.UUID(str(annotation.id)))
        except ValueError:
            return str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"id:{annotation.id}"))
    poly = np.ascontiguousarray(np.asarray(annotation.polygon, dtype=np.float64))
    digest = hashlib.sha1(poly.tobytes()).hexdigest()
    return str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"{index}:{annotation.name}:{digest}"))


def _finite_measurements(measurements: dict) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for key, value in (measurements or {}).items():
        if isinstance(value, (bool, np.bool_)):
            continue
        if isinstance(value, (int, np.integer)):
            out[str(key)] = int(value)
            continue
        try:
            f = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(key)] = f
    return out


def annotation_to_feature(
    annotation: Annotation,
    index: int = 0,
    class_colors: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """The GeoJSON Feature of one annotation (the format is described in :mod:`.geojson`).

    Parameters
    ----------
    annotation : Annotation
        Level-0 polygon, name, class, review state, measurements, properties.
    index : int
        Position in its collection: names it in errors and seeds the content-derived id of an
        annotation without ``id``.
    class_colors : mapping of str to (r, g, b), optional
        Colours of classes without a colour of their own (default: QuPath's).

    Returns
    -------
    dict
        A JSON-ready ``Feature``.

    Raises
    ------
    GeoJSONError
        Fewer than 3 distinct points, non-finite coordinates, a bad colour or review state.
    """
    what = f"annotation {index} ({annotation.name!r})"
    if annotation.review not in REVIEW_STATES:
        raise GeoJSONError(f"{what}: review {annotation.review!r} not in {REVIEW_STATES}")
    rings = [_ring_for_output(annotation.polygon, what)]
    rings += [_ring_for_output(h, f"{what} hole {k}") for k, h in enumerate(annotation.holes)]

    props: dict[str, Any] = json_safe(dict(annotation.properties or {}))
    ours = props.get(PROPERTIES_KEY)
    ours = dict(ours) if isinstance(ours, dict) else {}
    ours["review"] = annotation.review
    props["objectType"] = annotation.object_type or "annotation"
    props["name"] = annotation.name or ""
    if annotation.color is not None:
        props["color"] = _rgb(annotation.color, what)
    else:
        props.pop("color", None)
    if annotation.classification:
        colour = annotation.class_color
        if colour is None:
            colour = class_color(annotation.classification, class_colors)
        props["classification"] = {
            "name": str(annotation.classification),
            "color": _rgb(colour, what),
        }
    else:
        props.pop("classification", None)
    props["measurements"] = _finite_measurements(annotation.measurements)
    props["isLocked"] = bool(props.get("isLocked", False))
    props[PROPERTIES_KEY] = ours
    return {
        "type": "Feature",
        "id": _feature_id(annotation, index),
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": props,
    }


def annotations_to_feature_collection(
    annotations: Iterable[Annotation],
    class_colors: Mapping[str, Sequence[int]] | None = None,
) -> dict:
    """A QuPath-compatible GeoJSON ``FeatureCollection`` of the annotations.

    Parameters
    ----------
    annotations : iterable of Annotation
        What to encode, in order.
    class_colors : mapping of str to (r, g, b), optional
        Overrides the default class colours for classes without a colour of their own.

    Returns
    -------
    dict
        ``{"type": "FeatureCollection", "features": [...]}`` (:func:`annotation_to_feature`).

    Raises
    ------
    GeoJSONError
        For an annotation that cannot be written (see :func:`annotation_to_feature`).
    """
    return {
        "type": "FeatureCollection",
        "features": [annotation_to_feature(a, i, class_colors) for i, a in enumerate(annotations)],
    }


def write_geojson(
    path: str | os.PathLike,
    annotations: Iterable[Annotation],
    class_colors: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Write the annotations as a QuPath-compatible GeoJSON FeatureCollection, atomically.

    Parameters
    ----------
    path : path-like
        The file (its folder is created when missing).
    annotations : iterable of Annotation
        What to write; every one is checked before the file is touched.
    class_colors : mapping of str to (r, g, b), optional
        See :func:`annotations_to_feature_collection`.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    GeoJSONError
        For an annotation that cannot be written; the previous file, if any, is left intact.
    """
    fc = annotations_to_feature_collection(list(annotations), class_colors)
    # one feature per line: readable and diffable, yet encoded by json's fast C encoder
    # (``indent=`` would switch to the pure-Python one, ~10x slower on large polygons)
    lines = [json.dumps(f, allow_nan=False, ensure_ascii=False) for f in fc["features"]]
    text = '{"type": "FeatureCollection", "features": [\n' + ",\n".join(lines) + "\n]}\n"
    return atomic_write_text(path, text)
