"""Classes and review states of shapes, and the keys that set them.

The Annotations layer of a slide and the ROI layers of a Magnify run have the same two features
columns, ``class`` (``""`` = unclassified) and ``review`` (``unreviewed`` / ``accepted`` /
``rejected``), so classes and review states are set the same way on both, from the widget
(:func:`set_class`, :func:`set_review`) or with keys (:func:`bind_review_keys`):

==============  =====================================================================
``Shift-A``     accept the selected shapes
``Shift-R``     reject them
``Shift-U``     back to unreviewed
``Alt-1`` …     class 1 … 9 of the widget's class list (Tumor, Normal, Other by default)
==============  =====================================================================

(napari's Shapes layer already uses ``1``/``2``/``3`` — vertex remove / vertex insert /
*delete selected shapes* — so plain digits would destroy work; ``Shift-A``/``R``/``U`` and
``Alt-digit`` are unbound in napari's Shapes keymap.)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

from ..io.annotation import DEFAULT_CLASSES, REVIEW_STATES
from ..io.colors import review_style
from .layers import restyle

__all__ = [
    "CLASS_KEYS",
    "REVIEW_KEYS",
    "ClassProvider",
    "apply_drawing_colors",
    "drawing_colors_on_change",
    "bind_review_keys",
    "default_classes",
    "set_class",
    "set_review",
]

CLASS_KEYS = tuple(f"Alt-{i}" for i in range(1, 10))
REVIEW_KEYS = {"Shift-A": "accepted", "Shift-R": "rejected", "Shift-U": "unreviewed"}

ClassProvider = Callable[[], Sequence[str]]


def default_classes() -> list[str]:
    """QuPath's default class names (Tumor, Normal, Other).

    Returns
    -------
    list of str
        A new list, ``["Tumor", "Normal", "Other"]``.
    """
    return list(DEFAULT_CLASSES)


def _selected(layer: Any, indices: Sequence[int] | None) -> list[int]:
    if indices is None:
        indices = sorted(getattr(layer, "selected_data", ()) or ())
    n = layer.nshapes
    return [int(i) for i in indices if 0 <= int(i) < n]


def _set_column(layer: Any, column: str, value: str, indices: Sequence[int] | None) -> int:
    idx = _selected(layer, indices)
    if not idx:
        return 0
    feats = layer.features.copy()
    if column not in feats:
        feats[column] = "" if column == "class" else "unreviewed"
    col = feats[column].astype(object).to_numpy().copy()
    col[idx] = value
    feats[column] = col
    selected = set(layer.selected_data)
    layer.features = feats  # emits events.features: the autosaver listens
    restyle(layer)
    layer.selected_data = selected
    return len(idx)


def set_review(layer: Any, state: str, indices: Sequence[int] | None = None) -> int:
    """Set the review state of shapes.

    Parameters
    ----------
    layer : napari.layers.Shapes
        An annotations or ROI layer.
    state : str
        One of :data:`~napari_magnet.io.annotation.REVIEW_STATES`.
    indices : sequence of int, optional
        The shapes (default: the selected ones).

    Returns
    -------
    int
        How many shapes changed.
    """
    if state not in REVIEW_STATES:
        raise ValueError(f"review state {state!r} not in {REVIEW_STATES}")
    return _set_column(layer, "review", state, indices)


def set_class(layer: Any, name: str | None, indices: Sequence[int] | None = None) -> int:
    """Set the class of shapes.

    Parameters
    ----------
    layer : napari.layers.Shapes
        An annotations or ROI layer.
    name : str or None
        The class; ``None`` or ``""`` unclassifies.
    indices : sequence of int, optional
        The shapes (default: the selected ones).

    Returns
    -------
    int
        How many shapes changed.
    """
    return _set_column(layer, "class", str(name or ""), indices)


def bind_review_keys(layer: Any, classes: ClassProvider = default_classes) -> None:
    """Bind ``Shift-A``/``Shift-R``/``Shift-U`` and ``Alt-1`` … ``Alt-9`` on a layer.

    Parameters
    ----------
    layer : napari.layers.Shapes
        The layer.
    classes : callable
        Returns the class names ``Alt-1`` … ``Alt-9`` stand for, when pressed.
    """
    for key, state in REVIEW_KEYS.items():
        layer.bind_key(key, _review_action(state), overwrite=True)
    for i, key in enumerate(CLASS_KEYS):
        layer.bind_key(key, _class_action(i, classes), overwrite=True)


def _review_action(state: str):
    def action(layer):
        set_review(layer, state)

    action.__name__ = f"review_{state}"
    action.__doc__ = f"Mark the selected shapes {state}"
    return action


def _class_action(index: int, classes: ClassProvider):
    def action(layer):
        names = list(classes())
        if index < len(names):
            set_class(layer, names[index])

    action.__name__ = f"class_{index + 1}"
    action.__doc__ = f"Give the selected shapes class {index + 1} of the widget's list"
    return action


def apply_drawing_colors(layer: Any, class_colors: dict | None = None) -> None:
    """Give the shapes drawn next in ``layer`` the colours of the class they will get.

    The edge takes the class colour of ``layer.feature_defaults["class"]`` and the face the
    same colour, light (as :func:`~napari_magnet.io.colors.review_style` styles a classified
    shape); an unclassified shape gets a yellow edge and no fill. Nothing changes while
    shapes are selected: napari would recolour them.

    Parameters
    ----------
    layer : napari.layers.Shapes
        An annotations layer.
    class_colors : dict, optional
        Class colours overriding the defaults.
    """
    if len(layer.selected_data):
        return
    defaults = layer.feature_defaults
    klass = defaults["class"].iloc[0] if "class" in defaults and len(defaults) else ""
    klass = klass if isinstance(klass, str) else ""
    edges, faces, _ = review_style([klass], ["unreviewed"], class_colors)
    layer.current_edge_color = edges[0]
    layer.current_face_color = faces[0]


def drawing_colors_on_change(layer: Any) -> Callable[..., None]:
    """An event callback that reapplies :func:`apply_drawing_colors` to ``layer`` (held
    weakly): connect it to the layer's ``feature_defaults`` and ``mode`` events.

    Parameters
    ----------
    layer : napari.layers.Shapes
        An annotations layer.

    Returns
    -------
    callable
        The callback.
    """
    ref = weakref.ref(layer)

    def on_change(event=None):
        target = ref()
        if target is not None:
            apply_drawing_colors(target)

    return on_change
