"""The annotation record shared by the GeoJSON reader and writer, in level-0 pixels (x, y).

:class:`Annotation` is one area annotation or ROI as QuPath's GeoJSON holds it (DESIGN §2, §8);
this module also holds the vocabulary every encoding of annotations shares: the review states,
QuPath's default classes, the key of our namespaced properties, and the errors of the GeoJSON
reader and writer. It imports nothing of the project's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Annotation",
    "DEFAULT_CLASSES",
    "FEATURE_ID_NAMESPACE",
    "GeoJSONError",
    "GeoJSONSkipWarning",
    "PROPERTIES_KEY",
    "REVIEW_STATES",
    "has_three_distinct_points",
    "rectangle",
    "ring_area",
]

#: Review states of an annotation, in the order a reviewer usually meets them.
REVIEW_STATES: tuple[str, ...] = ("unreviewed", "accepted", "rejected")

#: QuPath-like default class colours.
DEFAULT_CLASSES: dict[str, tuple[int, int, int]] = {
    "Tumor": (200, 0, 0),
    "Normal": (0, 150, 0),
    "Other": (255, 200, 0),
}

#: Key of our namespaced dict inside a feature's ``properties``.
PROPERTIES_KEY = "napari_magnet"

#: Namespace of the stable UUIDs given to features (:func:`uuid.uuid5`).
FEATURE_ID_NAMESPACE = uuid.UUID("4f1c6a52-9d0e-5b8e-a3c1-6d2f3b7e9a10")


class GeoJSONError(ValueError):
    """A GeoJSON file (or object) that cannot be read or written; the message names both."""


class GeoJSONSkipWarning(UserWarning):
    """Some features were skipped because their geometry is not an area (points, lines)."""


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
        return (
            float(p[:, 0].min()),
            float(p[:, 1].min()),
            float(p[:, 0].max()),
            float(p[:, 1].max()),
        )

    @property
    def area(self) -> float:
        """Area in level-0 pixels² (shoelace; holes subtracted)."""
        return ring_area(np.asarray(self.polygon, dtype=float)) - sum(
            ring_area(np.asarray(h, dtype=float)) for h in self.holes
        )


def rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The 4-corner polygon of a box.

    Parameters
    ----------
    x0, y0, x1, y1 : float
        The box, level-0 pixels.

    Returns
    -------
    np.ndarray
        ``(4, 2)`` float corners (x0, y0) → (x1, y0) → (x1, y1) → (x0, y1): clockwise on
        screen (y down), counter-clockwise in a y-up frame.
    """
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def has_three_distinct_points(arr: np.ndarray) -> bool:
    """Whether a ring can enclose an area.

    Parameters
    ----------
    arr : np.ndarray
        ``(K, 2)`` points.

    Returns
    -------
    bool
        ``True`` when at least 3 of the points are distinct (O(K), no sort).
    """
    if len(arr) < 3:
        return False
    not_first = np.any(arr != arr[0], axis=1)
    if not not_first.any():
        return False
    second = arr[int(np.argmax(not_first))]
    return bool(np.any(not_first & np.any(arr != second, axis=1)))


def ring_area(ring: np.ndarray) -> float:
    """Area enclosed by a ring (shoelace formula, orientation ignored).

    Parameters
    ----------
    ring : np.ndarray
        ``(K, 2)`` vertices, not repeating the first at the end.

    Returns
    -------
    float
        The area in the square of the vertices' unit; 0 for fewer than 3 vertices.
    """
    if len(ring) < 3:
        return 0.0
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)
