"""Reading GeoJSON annotations — ours and QuPath's — into :class:`~.annotation.Annotation`.

What is accepted, what is skipped (points, lines) and what is an error is described in
:mod:`.geojson`. Reading never partially applies: it returns the complete list or raises
:class:`~.annotation.GeoJSONError`.

This module reads files, features and their properties; a feature's geometry is parsed and
checked by :class:`~.geojson_geometry.GeometryReader` (whose :data:`COORD_LIMIT` is
importable from here too).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

from .annotation import (
    PROPERTIES_KEY,
    REVIEW_STATES,
    Annotation,
    GeoJSONError,
    GeoJSONSkipWarning,
)
from .geojson_geometry import COORD_LIMIT, GEOMETRY_TYPES, GeometryReader

__all__ = [
    "COORD_LIMIT",
    "GeoJSONReadResult",
    "MAX_FEATURES",
    "MAX_FILE_BYTES",
    "MAX_VERTICES",
    "load_geojson",
    "parse_geojson",
    "read_geojson",
]

#: Most features accepted in one file (skipped ones included).
MAX_FEATURES = 200_000
#: Most vertices accepted in one file, all rings together.
MAX_VERTICES = 20_000_000
#: Largest file read, in bytes.
MAX_FILE_BYTES = 1 << 30


@dataclass
class GeoJSONReadResult:
    """What :func:`load_geojson` found: the annotations and one line per skipped feature."""

    annotations: list[Annotation]
    skipped: list[str]


class _Reader(GeometryReader):
    def __init__(
        self,
        source: str,
        max_extent: tuple[float, float] | None,
        extent_tolerance: float,
        max_features: int,
        max_vertices: int,
    ) -> None:
        super().__init__(source, max_extent, extent_tolerance, max_vertices)
        self.max_features = max_features

    # -- top level ---------------------------------------------------------------------------
    def features(self, data: Any) -> list[tuple[Any, str]]:
        if isinstance(data, list):
            feats = data
            where = "list"
        elif isinstance(data, dict):
            kind = data.get("type")
            if kind == "FeatureCollection":
                feats = data.get("features")
                if not isinstance(feats, list):
                    raise self.fail("FeatureCollection has no 'features' list")
                where = "features"
            elif kind == "Feature":
                feats = [data]
                where = "feature"
            elif kind in GEOMETRY_TYPES:
                feats = [{"type": "Feature", "geometry": data, "properties": {}}]
                where = "geometry"
            elif kind is None:
                raise self.fail("not GeoJSON: the top-level object has no 'type'")
            else:
                raise self.fail(f"not GeoJSON: unknown top-level type {str(kind)[:60]!r}")
        else:
            raise self.fail(
                "not GeoJSON: expected a FeatureCollection, a Feature or a list of Features, "
                f"got {type(data).__name__}"
            )
        if len(feats) > self.max_features:
            raise self.fail(f"too many features ({len(feats)} > {self.max_features})")
        return [
            (f, f"{where}[{i}]" if where in ("list", "features") else where)
            for i, f in enumerate(feats)
        ]

    def read(self, data: Any) -> list[Annotation]:
        feats = self.features(data)
        annotations: list[Annotation] = []
        for feat, where in feats:
            annotations.extend(self.feature(feat, where))
        if not annotations and self.skipped:
            raise self.fail(
                "no Polygon or MultiPolygon features, only other geometry types ("
                + "; ".join(self.skipped[:5])
                + (" …" if len(self.skipped) > 5 else "")
                + ")"
            )
        return annotations

    # -- one feature -------------------------------------------------------------------------
    def feature(self, feat: Any, where: str) -> list[Annotation]:
        if not isinstance(feat, dict):
            raise self.fail(f"{where} is not a Feature object but {type(feat).__name__}")
        if feat.get("type") != "Feature":
            raise self.fail(f"{where} has type {str(feat.get('type'))[:60]!r}, not 'Feature'")
        if "geometry" not in feat:
            raise self.fail(f"{where} has no 'geometry'")
        props = feat.get("properties")
        if props is None:
            props = {}
        if not isinstance(props, dict):
            raise self.fail(f"{where}: 'properties' is not an object")
        fid = feat.get("id")
        if isinstance(fid, bool) or (fid is not None and not isinstance(fid, (str, int, float))):
            raise self.fail(f"{where}: 'id' must be a string or a number")
        fid = None if fid is None else str(fid)

        polygons = self.geometry(feat["geometry"], where, 0)
        if not polygons:
            return []
        base = self.properties(props, where)
        out = []
        for k, (shell, holes) in enumerate(polygons):
            extra = _deep_copy_json(base["properties"])
            if len(polygons) > 1:
                ours = extra.setdefault(PROPERTIES_KEY, {})
                ours.update({"part": k, "parts": len(polygons), "source_id": fid})
            out.append(
                Annotation(
                    polygon=shell,
                    name=base["name"],
                    classification=base["classification"],
                    review=base["review"],
                    measurements=dict(base["measurements"]),
                    object_type=base["object_type"],
                    properties=extra,
                    color=base["color"],
                    id=fid if len(polygons) == 1 else None,
                    holes=holes,
                    class_color=base["class_color"],
                )
            )
        return out

    # -- properties --------------------------------------------------------------------------
    def properties(self, props: dict, where: str) -> dict:
        rest = _deep_copy_json(props)
        object_type = rest.pop("objectType", "annotation")
        if object_type is None:
            object_type = "annotation"
        if not isinstance(object_type, str):
            raise self.fail(f"{where}: 'objectType' is not a string")
        name = rest.pop("name", "")
        if name is None:
            name = ""
        if isinstance(name, bool) or not isinstance(name, (str, int, float)):
            raise self.fail(f"{where}: 'name' is not a string")
        color = self.color(rest.pop("color", None), f"{where} color")

        classification, klass_color = None, None
        raw_class = rest.pop("classification", None)
        if isinstance(raw_class, str):
            classification = raw_class or None
        elif isinstance(raw_class, dict):
            cname = raw_class.get("name")
            if cname is None and isinstance(raw_class.get("names"), list):
                names = raw_class["names"]
                if not all(isinstance(s, str) for s in names):
                    raise self.fail(f"{where}: classification 'names' are not strings")
                cname = ": ".join(names)
            if cname is not None and not isinstance(cname, str):
                raise self.fail(f"{where}: classification name is not a string")
            classification = cname or None
            if "color" in raw_class:
                klass_color = self.color(raw_class["color"], f"{where} classification color")
            elif "colorRGB" in raw_class:
                klass_color = self.color(raw_class["colorRGB"], f"{where} classification color")
        elif raw_class is not None:
            raise self.fail(f"{where}: 'classification' is neither an object nor a string")
        if classification is None:
            klass_color = None

        measurements = self.measurements(rest.pop("measurements", None), where)

        review = "unreviewed"
        ours = rest.get(PROPERTIES_KEY)
        raw_review = None
        if isinstance(ours, dict) and "review" in ours:
            ours = dict(ours)
            raw_review = ours.pop("review")
            if ours:
                rest[PROPERTIES_KEY] = ours
            else:
                rest.pop(PROPERTIES_KEY)
        elif isinstance(rest.get("review"), str):
            raw_review = rest.pop("review")
        if raw_review is not None:
            if not isinstance(raw_review, str) or raw_review.lower() not in REVIEW_STATES:
                raise self.fail(
                    f"{where}: review state {str(raw_review)[:40]!r} is not one of "
                    f"{', '.join(REVIEW_STATES)}"
                )
            review = raw_review.lower()
        return {
            "object_type": object_type,
            "name": str(name),
            "color": color,
            "classification": classification,
            "class_color": klass_color,
            "measurements": measurements,
            "review": review,
            "properties": rest,
        }

    def color(self, value: Any, where: str) -> tuple[int, int, int] | None:
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(2**31) <= value < 2**32:
                raise self.fail(f"{where}: packed colour {value} out of range")
            v = value & 0xFFFFFF  # QuPath packs ARGB into a signed 32-bit int
            return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
        if (
            isinstance(value, list)
            and len(value) in (3, 4)
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in value)
            and all(math.isfinite(c) and 0 <= c <= 255 for c in value)
        ):
            r, g, b = (int(round(c)) for c in value[:3])
            return (r, g, b)
        raise self.fail(f"{where}: {str(value)[:60]!r} is not an [r, g, b] colour in 0..255")

    def measurements(self, raw: Any, where: str) -> dict[str, float]:
        if raw is None:
            return {}
        if isinstance(raw, list):  # QuPath 0.2: [{"name": ..., "value": ...}, ...]
            items = []
            for item in raw:
                if not isinstance(item, dict) or "name" not in item or "value" not in item:
                    raise self.fail(f"{where}: measurements list items need 'name' and 'value'")
                items.append((item["name"], item["value"]))
        elif isinstance(raw, dict):
            items = list(raw.items())
        else:
            raise self.fail(f"{where}: 'measurements' is neither an object nor a list")
        out: dict[str, float] = {}
        for key, value in items:
            if not isinstance(key, str):
                raise self.fail(f"{where}: measurement name {str(key)[:40]!r} is not a string")
            if value is None:
                continue  # QuPath may write missing values as null
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(
                    f"{where}: measurement {key[:40]!r} is not a number: {str(value)[:40]!r}"
                )
            try:
                f = float(value)
            except OverflowError:
                continue
            if math.isfinite(f):  # QuPath writes NaN for undefined measurements: dropped
                out[key] = f
        return out


def _deep_copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy_json(v) for v in value]
    return value


def _decode(data: str | bytes | bytearray, source: str) -> Any:
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise GeoJSONError(f"{source}: not UTF-8 text ({exc.reason})") from None
    elif data.startswith("\ufeff"):
        data = data[1:]
    if not data.strip():
        raise GeoJSONError(f"{source}: empty file, not GeoJSON")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise GeoJSONError(
            f"{source}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise GeoJSONError(f"{source}: malformed JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. integers too long to convert
        raise GeoJSONError(f"{source}: malformed JSON: {exc}") from None


def _load(
    data: Any,
    source: str,
    *,
    decoded: bool,
    max_extent: tuple[float, float] | None,
    extent_tolerance: float,
    max_features: int,
    max_vertices: int,
) -> GeoJSONReadResult:
    reader = _Reader(source, max_extent, extent_tolerance, max_features, max_vertices)
    if not decoded:
        data = _decode(data, source)
    try:
        annotations = reader.read(data)
    except GeoJSONError:
        raise
    except RecursionError:
        raise GeoJSONError(f"{source}: not GeoJSON: nested too deeply") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        # a safety net: any structure the checks above did not anticipate is still "not
        # GeoJSON", never another exception type
        raise GeoJSONError(f"{source}: not valid GeoJSON ({type(exc).__name__}: {exc})") from None
    return GeoJSONReadResult(annotations, reader.skipped)


def load_geojson(
    path: str | os.PathLike,
    *,
    max_extent: tuple[float, float] | None = None,
    extent_tolerance: float = 0.01,
    max_features: int = MAX_FEATURES,
    max_vertices: int = MAX_VERTICES,
) -> GeoJSONReadResult:
    """Read a GeoJSON file; return the annotations and the list of skipped features.

    Parameters
    ----------
    path : path-like
        The file.
    max_extent : (width, height) or None
        Level-0 size of the slide the annotations belong to; coordinates outside
        ``[-tol, width + tol] × [-tol, height + tol]`` are an error, with
        ``tol = max(extent_tolerance · max(width, height), 1 px)``. Without it the bound is
        ±:data:`COORD_LIMIT`.
    extent_tolerance : float
        Fraction of the slide's longer side allowed beyond its edges.
    max_features, max_vertices : int
        Bounds on the number of features and of vertices (all rings together).

    Returns
    -------
    GeoJSONReadResult
        The annotations and one line per skipped (non-area) feature.

    Raises
    ------
    GeoJSONError
        For every problem (see :mod:`.geojson`); never returns a partial result.
    """
    source = str(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise GeoJSONError(f"{source}: file too large ({size} bytes > {MAX_FILE_BYTES})")
        with open(path, "rb") as fh:
            raw = fh.read()
    except GeoJSONError:
        raise
    except OSError as exc:
        raise GeoJSONError(f"{source}: cannot read file: {exc.strerror or exc}") from None
    return _load(
        raw,
        source,
        decoded=False,
        max_extent=max_extent,
        extent_tolerance=extent_tolerance,
        max_features=max_features,
        max_vertices=max_vertices,
    )


def _warn_skipped(source: str, skipped: list[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:5]) + (
            f"; … ({len(skipped)} in all)" if len(skipped) > 5 else ""
        )
        warnings.warn(
            f"{source}: skipped {len(skipped)} feature(s) that are not areas: {shown}",
            GeoJSONSkipWarning,
            stacklevel=3,
        )


def read_geojson(
    path: str | os.PathLike,
    *,
    max_extent: tuple[float, float] | None = None,
    extent_tolerance: float = 0.01,
    max_features: int = MAX_FEATURES,
    max_vertices: int = MAX_VERTICES,
) -> list[Annotation]:
    """Read a GeoJSON file (ours or QuPath's) into annotations.

    Like :func:`load_geojson`, but reports skipped features (points, lines) with one
    :class:`~.annotation.GeoJSONSkipWarning`.

    Parameters
    ----------
    path, max_extent, extent_tolerance, max_features, max_vertices
        As for :func:`load_geojson`; so are the errors.

    Returns
    -------
    list of Annotation
        Every area feature, one per polygon.
    """
    result = load_geojson(
        path,
        max_extent=max_extent,
        extent_tolerance=extent_tolerance,
        max_features=max_features,
        max_vertices=max_vertices,
    )
    _warn_skipped(str(path), result.skipped)
    return result.annotations


def parse_geojson(
    data: str | bytes | bytearray | dict | list,
    *,
    source: str = "<geojson>",
    max_extent: tuple[float, float] | None = None,
    extent_tolerance: float = 0.01,
    max_features: int = MAX_FEATURES,
    max_vertices: int = MAX_VERTICES,
) -> list[Annotation]:
    """Parse GeoJSON text, bytes, or an already-decoded object.

    Same rules, parameters and errors as :func:`read_geojson`.

    Parameters
    ----------
    data : str, bytes, dict or list
        The GeoJSON text (UTF-8 bytes) or the object :func:`json.loads` made of it.
    source : str
        Names the data in error messages.

    Returns
    -------
    list of Annotation
        Every area feature, one per polygon.
    """
    result = _load(
        data,
        source,
        decoded=not isinstance(data, (str, bytes, bytearray)),
        max_extent=max_extent,
        extent_tolerance=extent_tolerance,
        max_features=max_features,
        max_vertices=max_vertices,
    )
    _warn_skipped(source, result.skipped)
    return result.annotations
