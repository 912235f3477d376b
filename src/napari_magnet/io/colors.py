"""Colours of annotations and ROIs: by class, by ROI lineage, and by review state.

All colours here are 0–255 ``(r, g, b)`` triples except the layer styling of
:func:`review_style`, which returns napari's RGBA floats in [0, 1]. Pure numpy; imports nothing
of the project's but the annotation vocabulary.
"""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from .annotation import DEFAULT_CLASSES, REVIEW_STATES

__all__ = [
    "REJECTED_RGBA",
    "WIDTH_FACTOR",
    "branch_color",
    "class_color",
    "review_style",
    "rgb_to_rgba",
]

#: Branch hues, chosen apart from the attention overlays' viridis (blue-teal-green-yellow):
#: an outline must stand out on the map under it.
_BRANCH_PALETTE: tuple[tuple[int, int, int], ...] = (
    (214, 39, 40),  # red
    (255, 127, 14),  # orange
    (148, 103, 189),  # purple
    (227, 26, 160),  # magenta
    (140, 86, 75),  # brown
    (247, 129, 191),  # pink
    (120, 0, 50),  # wine
    (20, 20, 20),  # black
)
#: Hues (0–1) of the branches past the palette: blue-violet through red to orange.
_HUE_START, _HUE_SPAN = 0.68, 0.42


def _hash_unit(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def class_color(
    name: str, class_colors: Mapping[str, Sequence[int]] | None = None
) -> tuple[int, int, int]:
    """Colour of a class.

    Parameters
    ----------
    name : str
        The class name.
    class_colors : mapping of str to (r, g, b), optional
        Colours that take precedence over :data:`~.annotation.DEFAULT_CLASSES`.

    Returns
    -------
    (int, int, int)
        ``class_colors[name]``, else the default class colour (both looked up
        case-insensitively), else a deterministic saturated colour hashed from the name (same
        name → same colour, across runs and machines).
    """
    for table in (class_colors or {}, DEFAULT_CLASSES):
        if name in table:
            return tuple(int(c) for c in table[name])  # type: ignore[return-value]
        for key, value in table.items():
            if key.lower() == name.lower():
                return tuple(int(c) for c in value)  # type: ignore[return-value]
    return _hsv_rgb(_hash_unit(name), 0.75, 0.9)


def branch_color(region_id: str) -> tuple[int, int, int]:
    """Colour of an ROI by its lineage.

    Parameters
    ----------
    region_id : str
        Lineage name, e.g. ``"2.1.3"``.

    Returns
    -------
    (int, int, int)
        The top-level ancestor (``"2"`` of ``"2.1.3"``) picks a distinct hue; each deeper
        layer is lighter (mixed further towards white).
    """
    parts = [p for p in str(region_id).split(".") if p != ""]
    root = parts[0] if parts else ""
    depth = max(len(parts), 1)
    if root.isdigit() and 1 <= int(root) <= len(_BRANCH_PALETTE):
        base = _BRANCH_PALETTE[int(root) - 1]
    elif root.isdigit():
        # golden-ratio walk over the allowed hues: neighbouring branches get far-apart hues
        walk = (int(root) * 0.6180339887) % 1.0
        base = _hsv_rgb(_HUE_START + _HUE_SPAN * walk, 0.8, 0.85)
    else:
        base = _hsv_rgb(_HUE_START + _HUE_SPAN * _hash_unit(root), 0.8, 0.85)
    t = min(0.65, 0.22 * (depth - 1))  # layer 1: the base colour; deeper: lighter
    return tuple(round(c + (255 - c) * t) for c in base)  # type: ignore[return-value]


def rgb_to_rgba(rgb: Sequence[int], alpha: float = 1.0) -> np.ndarray:
    """A 0–255 ``(r, g, b)`` colour as napari's RGBA.

    Parameters
    ----------
    rgb : sequence of int
        Red, green, blue in 0..255.
    alpha : float
        Opacity in [0, 1].

    Returns
    -------
    np.ndarray
        ``(4,)`` float RGBA in [0, 1].
    """
    return np.array([rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0, alpha], dtype=float)


# --------------------------------------------------------------------------------------------
# review styling
# --------------------------------------------------------------------------------------------

#: Edge colour of rejected shapes.
REJECTED_RGBA = (0.55, 0.55, 0.55, 0.8)
#: Edge width factors by review state.
WIDTH_FACTOR = {"unreviewed": 1.0, "accepted": 2.5, "rejected": 0.5}


def review_style(
    classes: Sequence[str],
    reviews: Sequence[str],
    class_colors: Mapping[str, Sequence[int]] | None = None,
    base_colors: np.ndarray | None = None,
    face_alpha: float = 0.15,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edge colours, face colours and edge-width factors by class and review state.

    The colour of a shape is its class's (:func:`class_color`), or ``base_colors[i]`` (ROI
    lineage colours) when unclassified, or yellow. Accepted shapes are drawn bold (×2.5
    width), rejected ones thin (×0.5) and grey with no fill; unreviewed ones as they are.
    Faces take the class colour at ``face_alpha`` (transparent when unclassified or rejected).

    Parameters
    ----------
    classes, reviews : sequence of str
        Class (``""`` = unclassified) and review state of each shape.
    class_colors : mapping of str to (r, g, b), optional
        Class colours overriding the defaults.
    base_colors : np.ndarray, optional
        ``(N, 4)`` RGBA of unclassified shapes.
    face_alpha : float
        Opacity of a classified shape's fill.

    Returns
    -------
    (edges, faces, widths)
        ``(N, 4)`` edge RGBA, ``(N, 4)`` face RGBA and ``(N,)`` edge-width factors
        (:data:`WIDTH_FACTOR`).
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
            rgba = rgb_to_rgba(class_color(klass, table))  # type: ignore[arg-type]
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
