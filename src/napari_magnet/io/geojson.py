"""QuPath-compatible GeoJSON for ROIs and annotations (DESIGN §2, §8): the format, and its API.

The code lives in :mod:`.annotation` (the record), :mod:`.geojson_write`, :mod:`.geojson_read`
and :mod:`.rois` (ROIs); this module gathers their public names.

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
:class:`~.rois.RoiTable`) and every other unknown property are preserved on a round trip.

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

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .annotation import (
    DEFAULT_CLASSES,
    PROPERTIES_KEY,
    REVIEW_STATES,
    Annotation,
    GeoJSONError,
    GeoJSONSkipWarning,
    rectangle,
)
from .colors import branch_color, class_color
from .geojson_read import (
    COORD_LIMIT,
    MAX_FEATURES,
    MAX_FILE_BYTES,
    MAX_VERTICES,
    GeoJSONReadResult,
    load_geojson,
    parse_geojson,
    read_geojson,
)
from .geojson_write import annotation_to_feature, annotations_to_feature_collection, write_geojson
from .rois import MEASUREMENT_NAMES, RoiTable

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
    "MAX_FILE_BYTES",
    "MAX_VERTICES",
    "MEASUREMENT_NAMES",
    "PROPERTIES_KEY",
    "REVIEW_STATES",
    "annotation_to_feature",
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


def steps_to_annotations(
    steps: Sequence[MagnifyStep], slide_name: str = "", probability: float | None = None
) -> list[Annotation]:
    """The regions of a Magnify run as unreviewed rectangle ROIs.

    Kept for callers of the former API; new code uses :class:`~.rois.RoiTable` directly.

    Parameters
    ----------
    steps, slide_name, probability
        As for :meth:`RoiTable.from_steps <.rois.RoiTable.from_steps>`.

    Returns
    -------
    list of Annotation
        ``RoiTable.from_steps(...).to_annotations()``.
    """
    return RoiTable.from_steps(
        steps, slide_name=slide_name, probability=probability
    ).to_annotations()
