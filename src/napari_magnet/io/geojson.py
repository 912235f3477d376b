"""QuPath-compatible GeoJSON for ROIs and annotations (DESIGN §2, §8).

Everything here is in **level-0 pixels, (x, y)**, x to the right, y down — QuPath's GeoJSON
convention — so a file written here opens in QuPath on the same slide and vice versa.

Writing
-------
A ``FeatureCollection`` (one feature per line, UTF-8, written atomically); each ``Feature``
has ``type``, ``id`` (a UUID string), ``geometry`` (a ``Polygon``: closed exterior ring in the
vertex order given, then any holes) and ``properties``::

    objectType      "annotation" (or the annotation's own object type)
    name            str
    color           [r, g, b]               only when the annotation has a colour
    classification  {"name", "color"}       only when a class is set (QuPath rejects a
                                            classification without a colour)
    measurements    {name: number}          finite numbers only (non-finite ones are dropped)
    isLocked        false                   (unless the annotation's properties say otherwise)
    napari_magnet   {"review": "unreviewed" | "accepted" | "rejected", ...}

The review state lives in the namespaced ``properties.napari_magnet.review`` so it cannot clash
with QuPath's own keys; other keys of that dict (e.g. the ROI lineage written by
:func:`steps_to_annotations`) and every other unknown property are preserved on a round trip.

Reading
-------
:func:`read_geojson` (a file) and :func:`parse_geojson` (text, bytes or already-decoded JSON)
accept our files and QuPath's exports: a ``FeatureCollection``, a single ``Feature``, a bare list
of Features (as QuPath sometimes writes) or a bare geometry; ``classification`` as a dict
(``name`` or QuPath 0.5's ``names``; ``color`` or QuPath 0.2's packed ``colorRGB``) or a plain
string; ``measurements`` as a dict or QuPath 0.2's list of ``{"name", "value"}``.

* ``Polygon`` → one :class:`Annotation` (holes kept in :attr:`Annotation.holes`).
* ``MultiPolygon`` → **one Annotation per polygon**, each with the feature's name, class,
  review state and measurements (geometry is never dropped); parts of a multi-part feature
  record ``{"part": k, "parts": n, "source_id": id}`` in ``properties.napari_magnet``.
* ``GeometryCollection`` → its polygons as above, its other members skipped.
* ``Point``, ``LineString``, ``MultiPoint``, ``MultiLineString`` and ``null`` geometries are
  **skipped**: :func:`load_geojson` returns them in ``skipped``; :func:`read_geojson` and
  :func:`parse_geojson` emit one :class:`GeoJSONSkipWarning` listing them. A file holding
  *only* such features (and at least one) is an error.

Any problem raises :class:`GeoJSONError` (a ``ValueError``) naming the file and the problem:
unreadable file, malformed JSON, not GeoJSON, missing ``geometry``/``coordinates``, non-numeric
or non-finite coordinates, coordinates beyond :data:`COORD_LIMIT` (or beyond ``max_extent`` with
a tolerance), rings with fewer than 3 distinct points, too many features or vertices. Reading
never partially applies: it returns the complete list or raises.
"""

from __future__ import annotations

import colorsys
import contextlib
import hashlib
import itertools
import json
import math
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine.types import MagnifyStep

__all__ = [
    "Annotation",
    "COORD_LIMIT",
    "DEFAULT_CLASSES",
    "GeoJSONError",
    "GeoJSONReadResult",
    "GeoJSONSkipWarning",
    "MAX_FEATURES",
    "MAX_VERTICES",
    "MEASUREMENT_NAMES",
    "REVIEW_STATES",
    "annotations_to_feature_collection",
    "branch_color",
    "class_color",
    "load_geojson",
    "parse_geojson",
    "read_geojson",
    "rectangle",
    "steps_to_annotations",
    "write_geojson",
]

# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------

#: Review states of an annotation, in the order a reviewer usually meets them.
REVIEW_STATES: tuple[str, ...] = ("unreviewed", "accepted", "rejected")

#: QuPath-like default class colours.
DEFAULT_CLASSES: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Normal": (0, 150, 0),
    "Other": (255, 200, 0),
}

#: Key of our namespaced dict inside ``properties``.
PROPERTIES_KEY = "napari_magnet"

#: Measurement names written by :func:`steps_to_annotations`.
MEASUREMENT_NAMES: dict[str, str] = {
    "attention_mass": "Attention mass",
    "scale": "Scale",
    "level": "Level",
    "layer": "Layer",
    "aux_probability": "Aux probability",
    "probability": "Probability",
}

#: Largest |coordinate| accepted, in level-0 pixels (a 10-million-pixel-wide slide is far
#: beyond any scanner; larger numbers are almost surely another unit or a corrupt file).
COORD_LIMIT = 1e7
#: Most features accepted in one file (skipped ones included).
MAX_FEATURES = 200_000
#: Most vertices accepted in one file, all rings together.
MAX_VERTICES = 20_000_000
#: Largest file read, in bytes.
MAX_FILE_BYTES = 1 << 30
#: Deepest GeometryCollection nesting followed.
_MAX_NESTING = 8

_ID_NAMESPACE = uuid.UUID("4f1c6a52-9d0e-5b8e-a3c1-6d2f3b7e9a10")

_SKIPPABLE = ("Point", "MultiPoint", "LineString", "MultiLineString")
_GEOMETRY_TYPES = ("Polygon", "MultiPolygon", "GeometryCollection", *_SKIPPABLE)


class GeoJSONError(ValueError):
    """A GeoJSON file (or object) that cannot be read or written; the message names both."""


class GeoJSONSkipWarning(UserWarning):
    """Some features were skipped because their geometry is not an area (points, lines)."""


# --------------------------------------------------------------------------------------------
# the record
# --------------------------------------------------------------------------------------------


@dataclass
class Annotation:
    """One area annotation or ROI, in level-0 pixels (x, y).

    Attributes
    ----------
    polygon : np.ndarray
        ``(K, 2)`` float exterior ring, level-0 x, y, *not* repeating the first
        vertex at the end. Rectangles are 4-corner polygons (see :func:`rectangle`).
    name : str
        Display name (the lineage id for ROIs).
    classification : str or None
        Class name, e.g. ``"Tumor"``; ``None`` when unclassified.
    review : str
        One of :data:`REVIEW_STATES`.
    measurements : dict of str to float
        Numeric measurements (QuPath's measurement table).
    object_type : str
        QuPath object type, ``"annotation"`` unless read otherwise (``"detection"``, …).
    properties : dict
        Every other property of the feature, preserved on a round trip (including the rest of
        our ``napari_magnet`` dict, e.g. ROI lineage).
    color : (r, g, b) or None
        The object's own colour; ``None`` to let the class colour (or QuPath's default) apply.
    id : str or None
        Feature id; a UUID string is kept as is, another string is mapped to a stable UUID on
        writing, ``None`` gets a stable UUID derived from the content.
    holes : list of np.ndarray
        Interior rings (``(K, 2)`` each), empty for simple polygons.
    class_color : (r, g, b) or None
        The class's colour as read from a file; ``None`` uses :func:`class_color`.
    """

    polygon: np.ndarray
    name: str = ""
    classification: str | None = None
    review: str = "unreviewed"
    measurements: dict[str, float] = field(default_factory=dict)
    object_type: str = "annotation"
    properties: dict = field(default_factory=dict)
    color: tuple[int, int, int] | None = None
    id: str | None = None
    holes: list[np.ndarray] = field(default_factory=list)
    class_color: tuple[int, int, int] | None = None

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` bounding box in level-0 pixels."""
        p = np.asarray(self.polygon, dtype=float)
        return (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()),
                float(p[:, 1].max()))

    @property
    def area(self) -> float:
        """Area in level-0 pixels² (shoelace; holes subtracted)."""
        return _ring_area(np.asarray(self.polygon, dtype=float)) - sum(
            _ring_area(np.asarray(h, dtype=float)) for h in self.holes
        )


def rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Return the 4-corner polygon ``(4, 2)`` of the box ``(x0, y0, x1, y1)``.

    Corners run (x0, y0) → (x1, y0) → (x1, y1) → (x0, y1): clockwise on screen (y down),
    counter-clockwise in a y-up frame.
    """
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _has_three_distinct(arr: np.ndarray) -> bool:
    """Whether a (K, 2) array holds at least 3 distinct points (O(K), no sort)."""
    if len(arr) < 3:
        return False
    not_first = np.any(arr != arr[0], axis=1)
    if not not_first.any():
        return False
    second = arr[int(np.argmax(not_first))]
    return bool(np.any(not_first & np.any(arr != second, axis=1)))


def _ring_area(ring: np.ndarray) -> float:
    if len(ring) < 3:
        return 0.0
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


# --------------------------------------------------------------------------------------------
# colours
# --------------------------------------------------------------------------------------------

_BRANCH_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),  # blue
    (255, 127, 14),  # orange
    (44, 160, 44),  # green
    (214, 39, 40),  # red
    (148, 103, 189),  # purple
    (23, 190, 207),  # cyan
    (227, 119, 194),  # pink
    (188, 189, 34),  # olive
    (140, 86, 75),  # brown
)


def _hash_unit(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def class_color(
    name: str, class_colors: dict[str, tuple[int, int, int]] | None = None
) -> tuple[int, int, int]:
    """Colour of a class: ``class_colors``, then :data:`DEFAULT_CLASSES` (case-insensitive),
    else a deterministic saturated colour hashed from the name (same name → same colour,
    across runs and machines)."""
    for table in (class_colors or {}, DEFAULT_CLASSES):
        if name in table:
            return tuple(int(c) for c in table[name])  # type: ignore[return-value]
        for key, value in table.items():
            if key.lower() == name.lower():
                return tuple(int(c) for c in value)  # type: ignore[return-value]
    return _hsv_rgb(_hash_unit(name), 0.75, 0.9)


def branch_color(region_id: str) -> tuple[int, int, int]:
    """Colour of an ROI by its lineage: the top-level ancestor (``"2"`` of ``"2.1.3"``) picks
    a distinct hue; each deeper layer is lighter (mixed further towards white)."""
    parts = [p for p in str(region_id).split(".") if p != ""]
    root = parts[0] if parts else ""
    depth = max(len(parts), 1)
    if root.isdigit() and 1 <= int(root) <= len(_BRANCH_PALETTE):
        base = _BRANCH_PALETTE[int(root) - 1]
    elif root.isdigit():
        # golden-ratio hue walk: neighbouring branch numbers get far-apart hues
        base = _hsv_rgb(0.11 + int(root) * 0.6180339887, 0.8, 0.85)
    else:
        base = _hsv_rgb(_hash_unit(root), 0.8, 0.85)
    t = min(0.65, 0.22 * (depth - 1))  # layer 1: the base colour; deeper: lighter
    return tuple(round(c + (255 - c) * t) for c in base)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# atomic file output (shared by io.ome and io.results)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto
    ``path``, on failure delete it. A crash never leaves a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        try:
            mode = path.stat().st_mode & 0o777
        except OSError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with _atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


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
    if not _has_three_distinct(arr):
        raise GeoJSONError(f"{what}: polygon needs at least 3 distinct points")
    return np.vstack([arr, arr[:1]]).tolist()


def _feature_id(annotation: Annotation, index: int) -> str:
    if annotation.id:
        try:
            return str(uuid.UUID(str(annotation.id)))
        except ValueError:
            return str(uuid.uuid5(_ID_NAMESPACE, f"id:{annotation.id}"))
    poly = np.ascontiguousarray(np.asarray(annotation.polygon, dtype=np.float64))
    digest = hashlib.sha1(poly.tobytes()).hexdigest()
    return str(uuid.uuid5(_ID_NAMESPACE, f"{index}:{annotation.name}:{digest}"))


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


def _json_safe(value: Any) -> Any:
    """JSON types for numpy scalars/arrays, tuples and paths; non-finite floats → None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)


def annotation_to_feature(
    annotation: Annotation,
    index: int = 0,
    class_colors: dict[str, tuple[int, int, int]] | None = None,
) -> dict:
    """Return the GeoJSON Feature (dict) of one annotation (see the module docstring)."""
    what = f"annotation {index} ({annotation.name!r})"
    if annotation.review not in REVIEW_STATES:
        raise GeoJSONError(f"{what}: review {annotation.review!r} not in {REVIEW_STATES}")
    rings = [_ring_for_output(annotation.polygon, what)]
    rings += [_ring_for_output(h, f"{what} hole {k}") for k, h in enumerate(annotation.holes)]

    props: dict[str, Any] = _json_safe(dict(annotation.properties or {}))
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
    class_colors: dict[str, tuple[int, int, int]] | None = None,
) -> dict:
    """Return a GeoJSON ``FeatureCollection`` (dict) of the annotations, QuPath-compatible.

    ``class_colors`` overrides :data:`DEFAULT_CLASSES` for classes without a colour of their
    own. Raises :class:`GeoJSONError` for an annotation that cannot be written (fewer than 3
    distinct points, non-finite coordinates, bad colour or review state).
    """
    return {
        "type": "FeatureCollection",
        "features": [
            annotation_to_feature(a, i, class_colors) for i, a in enumerate(annotations)
        ],
    }


def write_geojson(
    path: str | os.PathLike,
    annotations: Iterable[Annotation],
    class_colors: dict[str, tuple[int, int, int]] | None = None,
) -> Path:
    """Write the annotations as a QuPath-compatible GeoJSON FeatureCollection, atomically
    (temporary file + ``os.replace``). Returns the path."""
    fc = annotations_to_feature_collection(list(annotations), class_colors)
    # one feature per line: readable and diffable, yet encoded by json's fast C encoder
    # (``indent=`` would switch to the pure-Python one, ~10x slower on large polygons)
    lines = [json.dumps(f, allow_nan=False, ensure_ascii=False) for f in fc["features"]]
    text = '{"type": "FeatureCollection", "features": [\n' + ",\n".join(lines) + "\n]}\n"
    return _atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# MagnifyStep → ROIs
# --------------------------------------------------------------------------------------------


def steps_to_annotations(
    steps: Sequence[MagnifyStep],
    slide_name: str = "",
    probability: float | None = None,
) -> list[Annotation]:
    """Turn the regions of a Magnify run into rectangle ROIs.

    One :class:`Annotation` per region of every step: a 4-corner rectangle of its level-0 box,
    named by its lineage id, coloured by :func:`branch_color`, unclassified, ``"unreviewed"``,
    with measurements (names from :data:`MEASUREMENT_NAMES`): attention mass and scale (when the
    step has them per region), level, layer, the layer's aux probability (when present) and the
    slide ``probability`` (when given). The id is a UUID derived from ``slide_name`` and the
    lineage id, so re-exporting the same run gives the same ids. ``properties.napari_magnet``
    records ``slide``, ``region_id``, ``parent_id`` and ``layer``.
    """
    m = MEASUREMENT_NAMES
    out: list[Annotation] = []
    for step in steps:
        boxes = np.asarray(step.boxes, dtype=float).reshape(-1, 4)
        n = len(boxes)
        ids = [str(r) for r in step.region_ids]
        if len(ids) != n:
            raise ValueError(
                f"layer {step.layer}: {len(ids)} region ids for {n} boxes"
            )
        parents = [str(p) for p in (step.parent_ids or [])]
        levels = np.asarray(step.levels).reshape(-1)
        mass = np.asarray(step.attention_mass, dtype=float).reshape(-1)
        scales = np.asarray(step.scales, dtype=float).reshape(-1)
        for i in range(n):
            meas: dict[str, float] = {}
            if len(mass) == n:
                meas[m["attention_mass"]] = float(mass[i])
            if len(scales) == n:
                meas[m["scale"]] = float(scales[i])
            if len(levels) == n:
                meas[m["level"]] = float(levels[i])
            meas[m["layer"]] = float(step.layer)
            if step.aux_probability is not None:
                meas[m["aux_probability"]] = float(step.aux_probability)
            if probability is not None:
                meas[m["probability"]] = float(probability)
            rid = ids[i]
            out.append(
                Annotation(
                    polygon=rectangle(*boxes[i]),
                    name=rid,
                    classification=None,
                    review="unreviewed",
                    measurements=meas,
                    properties={
                        PROPERTIES_KEY: {
                            "slide": slide_name,
                            "region_id": rid,
                            "parent_id": parents[i] if i < len(parents) else "",
                            "layer": int(step.layer),
                        }
                    },
                    color=branch_color(rid),
                    id=str(uuid.uuid5(_ID_NAMESPACE, f"roi:{slide_name}:{rid}")),
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@dataclass
class GeoJSONReadResult:
    """What :func:`load_geojson` found: the annotations and one line per skipped feature."""

    annotations: list[Annotation]
    skipped: list[str]


class _Reader:
    def __init__(
        self,
        source: str,
        max_extent: tuple[float, float] | None,
        extent_tolerance: float,
        max_features: int,
        max_vertices: int,
    ) -> None:
        self.source = source
        self.max_features = max_features
        self.vertex_budget = max_vertices
        self.max_vertices = max_vertices
        self.skipped: list[str] = []
        if max_extent is not None:
            w, h = (float(v) for v in max_extent)
            if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
                raise ValueError(f"max_extent must be two positive numbers, got {max_extent!r}")
            tol = max(float(extent_tolerance) * max(w, h), 1.0)
            self.bounds = (-tol, -tol, w + tol, h + tol)
        else:
            self.bounds = (-COORD_LIMIT, -COORD_LIMIT, COORD_LIMIT, COORD_LIMIT)
        self.max_extent = max_extent

    def fail(self, problem: str) -> GeoJSONError:
        return GeoJSONError(f"{self.source}: {problem}")

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
            elif kind in _GEOMETRY_TYPES:
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
        return [(f, f"{where}[{i}]" if where in ("list", "features") else where)
                for i, f in enumerate(feats)]

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

    def geometry(self, geom: Any, where: str, depth: int) -> list[tuple[np.ndarray, list]]:
        if geom is None:
            self.skipped.append(f"{where}: null geometry")
            return []
        if not isinstance(geom, dict):
            raise self.fail(f"{where}: 'geometry' is not an object")
        kind = geom.get("type")
        if kind == "GeometryCollection":
            if depth >= _MAX_NESTING:
                raise self.fail(f"{where}: GeometryCollection nested too deeply")
            members = geom.get("geometries")
            if not isinstance(members, list):
                raise self.fail(f"{where}: GeometryCollection has no 'geometries' list")
            out = []
            for i, member in enumerate(members):
                out.extend(self.geometry(member, f"{where}.geometries[{i}]", depth + 1))
            return out
        if kind in _SKIPPABLE:
            if "coordinates" not in geom:
                raise self.fail(f"{where}: {kind} has no 'coordinates'")
            self.skipped.append(f"{where}: {kind} geometry")
            return []
        if kind not in ("Polygon", "MultiPolygon"):
            raise self.fail(f"{where}: unsupported geometry type {str(kind)[:60]!r}")
        if "coordinates" not in geom:
            raise self.fail(f"{where}: {kind} has no 'coordinates'")
        coords = geom["coordinates"]
        if kind == "Polygon":
            return [self.polygon(coords, f"{where} Polygon")]
        if not isinstance(coords, list) or not coords:
            raise self.fail(f"{where}: MultiPolygon 'coordinates' is not a non-empty list")
        return [self.polygon(c, f"{where} MultiPolygon[{i}]") for i, c in enumerate(coords)]

    def polygon(self, coords: Any, where: str) -> tuple[np.ndarray, list[np.ndarray]]:
        if not isinstance(coords, list) or not coords:
            raise self.fail(f"{where}: 'coordinates' is not a non-empty list of rings")
        rings = [self.ring(r, f"{where} ring {i}") for i, r in enumerate(coords)]
        return rings[0], rings[1:]

    def ring(self, raw: Any, where: str) -> np.ndarray:
        if not isinstance(raw, list):
            raise self.fail(f"{where}: a ring must be a list of [x, y] positions")
        n = len(raw)
        self.vertex_budget -= n
        if self.vertex_budget < 0:
            raise self.fail(f"too many vertices (more than {self.max_vertices})")
        arr = self._fast_ring(raw)
        if arr is None:
            arr = self._slow_ring(raw, where)
        if not np.all(np.isfinite(arr)):
            k = int(np.argwhere(~np.isfinite(arr))[0, 0])
            raise self.fail(f"{where}: position {k} has a non-finite coordinate (NaN/Infinity)")
        bx0, by0, bx1, by1 = self.bounds
        bad = (arr[:, 0] < bx0) | (arr[:, 0] > bx1) | (arr[:, 1] < by0) | (arr[:, 1] > by1)
        if np.any(bad):
            k = int(np.argmax(bad))
            limit = (
                f"the slide extent {tuple(self.max_extent)} (with tolerance)"
                if self.max_extent is not None
                else f"±{COORD_LIMIT:g} px"
            )
            raise self.fail(
                f"{where}: position {k} ({arr[k, 0]:g}, {arr[k, 1]:g}) is beyond {limit}"
            )
        if n > 1 and np.array_equal(arr[0], arr[-1]):
            arr = arr[:-1]
        if not _has_three_distinct(arr):
            raise self.fail(f"{where}: a polygon ring needs at least 3 distinct points")
        return arr

    @staticmethod
    def _fast_ring(raw: list) -> np.ndarray | None:
        """Vectorised parse of a well-formed ring; ``None`` sends it to the checking path."""
        if not raw:
            return None
        try:
            arr = np.array(raw)
        except (ValueError, TypeError, OverflowError):
            return None
        if arr.ndim != 2 or arr.shape[1] < 2 or arr.dtype.kind not in "if":
            return None
        # numpy silently turns JSON true/false mixed with numbers into 1/0: refuse those
        if not set(map(type, itertools.chain.from_iterable(raw))) <= {int, float}:
            return None
        return np.ascontiguousarray(arr[:, :2], dtype=np.float64)

    def _slow_ring(self, raw: list, where: str) -> np.ndarray:
        """Position-by-position parse that names the first bad position."""
        n = len(raw)
        arr = np.empty((n, 2), dtype=np.float64)
        for k, pt in enumerate(raw):
            if not isinstance(pt, (list, tuple)) or len(pt) < 2:
                raise self.fail(f"{where}: position {k} is not an [x, y] list")
            for d in (0, 1):
                v = pt[d]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise self.fail(
                        f"{where}: position {k} has a non-numeric coordinate {str(v)[:40]!r}"
                    )
                if isinstance(v, int) and abs(v) > COORD_LIMIT:
                    raise self.fail(
                        f"{where}: position {k} coordinate {str(v)[:40]} is beyond "
                        f"±{COORD_LIMIT:g} px"
                    )
                arr[k, d] = v
        return arr

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
    max_features, max_vertices : int
        Bounds on the number of features and of vertices (all rings together).

    Raises
    ------
    GeoJSONError
        For every problem (see the module docstring); never returns a partial result.
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
        shown = "; ".join(skipped[:5]) + (f"; … ({len(skipped)} in all)" if len(skipped) > 5
                                          else "")
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

    Like :func:`load_geojson`, but returns only the annotations and reports skipped features
    (points, lines) with one :class:`GeoJSONSkipWarning`.
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
    """Parse GeoJSON text, bytes, or an already-decoded object; same rules as
    :func:`read_geojson`, ``source`` names it in error messages."""
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
