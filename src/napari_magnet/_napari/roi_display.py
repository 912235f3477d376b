"""What makes a run's layers readable beyond their styling: ROI labels that never print over
each other, the hovered ROI described in the status bar, one colour bar for the attention
layers and the coverage layer's legend.

* :func:`layout_labels` picks, at the current zoom, the ROI labels that fit
  (:func:`~napari_magnet.io.roi_columns.label_layout`: an ROI large enough on screen, a label
  box that overlaps no label shown before it — layer 1 and larger ROIs first); the others get
  a transparent text colour (their text stays, so the layer's ``text.values`` are the ids).
* :func:`describe_hovered_roi` puts the id, layer, attention mass, pyramid level and
  probabilities of the ROI under the pointer (:func:`~napari_magnet.io.roi_columns.
  roi_description`) in the active layer's ``help``, which napari shows in the status bar,
  whichever layer is active; the layer's own help comes back when the pointer leaves.
* :func:`update_colorbars` shows napari's colour bar of the topmost visible attention layer
  of ours and hides the others' (every attention layer has the same scale, the attention
  mass rank: one bar reads them all).
* :func:`update_coverage_legend` names the coverage colours in the canvas's text overlay while
  a coverage layer of ours is shown.

:func:`install_roi_display` wires all of it to a viewer, once: a mouse-move callback, the
camera's zoom, layers inserted or removed, and our layers shown or hidden.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.coverage import coverage_legend
from ..io.roi_columns import label_layout, roi_description
from .layer_kinds import TEXT_COLOR, layer_info, layer_kind, slide_path_of

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

__all__ = [
    "LEGEND_PREFIX",
    "describe_hovered_roi",
    "hovered_roi",
    "install_roi_display",
    "layout_labels",
    "refresh",
    "update_colorbars",
    "update_coverage_legend",
]

#: How our coverage legend starts (the text overlay is only cleared when it shows ours).
LEGEND_PREFIX = "Coverage —"
#: Layer kinds whose visibility changes what :func:`refresh` shows.
WATCHED_KINDS = ("rois", "attention", "coverage")
_TEXT_RGBA = np.array([0.0, 0.0, 0.0, 1.0])
_HIDDEN_RGBA = np.array([0.0, 0.0, 0.0, 0.0])
_HOVER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer → (its help, ours)
_WATCHED: weakref.WeakSet = weakref.WeakSet()


def _camera(viewer: napari.Viewer) -> Any:
    """``viewer.scene.camera`` (napari >= 0.9 deprecates ``viewer.camera``), else the old."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def _text_overlay(viewer: napari.Viewer) -> Any:
    """The canvas's text overlay: ``viewer.canvas.overlays["text"]`` (napari >= 0.9
    deprecates ``viewer.text_overlay``), else the old attribute."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    if overlays is not None and "text" in overlays:
        return overlays["text"]
    return viewer.text_overlay


def install_roi_display(viewer: napari.Viewer) -> None:
    """Wire the readable-results display to a viewer (once; later calls only refresh).

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer; held weakly by the callbacks.
    """
    if not any(getattr(cb, "_napari_magnet", False) for cb in viewer.mouse_move_callbacks):
        ref = weakref.ref(viewer)

        def on_move(viewer: napari.Viewer, event: Any) -> None:
            if not getattr(event, "is_dragging", False):  # panning: nothing to describe
                describe_hovered_roi(viewer, event.position)

        def on_change(event: Any = None) -> None:
            target = ref()
            if target is None:
                return
            value = getattr(event, "value", None)
            if value is not None and value in target.layers:
                _watch(target, value)
            refresh(target)

        on_move._napari_magnet = True  # type: ignore[attr-defined]
        viewer.mouse_move_callbacks.append(on_move)
        _camera(viewer).events.zoom.connect(on_change)
        viewer.layers.events.inserted.connect(on_change)
        viewer.layers.events.removed.connect(on_change)
    for layer in viewer.layers:
        _watch(viewer, layer)
    refresh(viewer)


def _watch(viewer: napari.Viewer, layer: Any) -> None:
    if layer_kind(layer) not in WATCHED_KINDS or layer in _WATCHED:
        return
    _WATCHED.add(layer)
    ref = weakref.ref(viewer)

    def on_visible(event: Any = None) -> None:
        target = ref()
        if target is not None:
            refresh(target)

    layer.events.visible.connect(on_visible)


def refresh(viewer: napari.Viewer) -> None:
    """Lay the ROI labels out, pick the colour bar and the coverage legend again.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    """
    layout_labels(viewer)
    update_colorbars(viewer)
    update_coverage_legend(viewer)


def update_colorbars(viewer: napari.Viewer) -> None:
    """Show the colour bar of the topmost visible attention layer of ours, hide the others'.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer (napari without layer colour bars: nothing happens).
    """
    attention = [lyr for lyr in viewer.layers if layer_kind(lyr) == "attention"]
    shown = [lyr for lyr in attention if lyr.visible]
    for layer in attention:
        colorbar = getattr(layer, "colorbar", None)
        if colorbar is not None:
            colorbar.visible = bool(shown) and layer == shown[-1]


def update_coverage_legend(viewer: napari.Viewer) -> None:
    """Name the coverage colours in the canvas's text overlay while a coverage layer of ours
    is shown (the topmost one's legend); hide our legend when none is.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    """
    shown = [lyr for lyr in viewer.layers if layer_kind(lyr) == "coverage" and lyr.visible]
    overlay = _text_overlay(viewer)
    if shown:
        overlay.text = str(layer_info(shown[-1]).get("legend") or coverage_legend(1))
        overlay.position = "bottom_left"
        overlay.visible = True
    elif overlay.text.startswith(LEGEND_PREFIX):
        overlay.visible = False
        overlay.text = ""


# --------------------------------------------------------------------------------------------
# ROI labels
# --------------------------------------------------------------------------------------------


def _world_boxes(layer: Any) -> np.ndarray:
    scale = np.asarray(layer.scale, float)[-2:]
    translate = np.asarray(layer.translate, float)[-2:]
    out = np.zeros((layer.nshapes, 4))
    for i, verts in enumerate(layer.data):
        world = np.asarray(verts, float)[:, -2:] * scale + translate
        out[i] = (*world.min(axis=0), *world.max(axis=0))
    return out


def _text_mask(layer: Any) -> np.ndarray | None:
    colors = np.asarray(getattr(layer.text.color, "array", np.empty((0, 4))))
    return colors[:, 3] > 0 if colors.ndim == 2 and len(colors) == layer.nshapes else None


def layout_labels(viewer: napari.Viewer) -> None:
    """Show the ROI labels that fit at the current zoom (see the module docstring).

    The ROI layers of one run (or one file) are laid out together, layer 1 and larger ROIs
    first; a hidden label keeps its text and gets a transparent colour. Hidden layers are
    left as they are.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    """
    groups: dict[tuple, list] = {}
    for layer in viewer.layers:
        if layer_kind(layer) == "rois" and layer.nshapes and layer.visible and layer.text.visible:
            key = (slide_path_of(layer), layer_info(layer).get("run"), layer.metadata.get("path"))
            groups.setdefault(key, []).append(layer)
    zoom = float(_camera(viewer).zoom)
    for layers in groups.values():
        rows = []  # (layer no, -area, position in group, index, box)
        for n, layer in enumerate(layers):
            depth = int(layer_info(layer).get("layer", 1) or 1)
            for i, box in enumerate(_world_boxes(layer)):
                rows.append((depth, -(box[2] - box[0]) * (box[3] - box[1]), n, i, box))
        rows.sort(key=lambda r: r[:4])
        texts = [[str(t) for t in layer.text.values] for layer in layers]
        anchors = [str(getattr(lyr.text.anchor, "value", lyr.text.anchor)) for lyr in layers]
        shown = label_layout(
            np.array([r[4] for r in rows]).reshape(-1, 4),
            [anchors[r[2]] for r in rows],
            [float(layers[r[2]].text.size) for r in rows],
            [texts[r[2]][r[3]] if r[3] < len(texts[r[2]]) else "" for r in rows],
            zoom,
        )
        masks = [np.zeros(layer.nshapes, bool) for layer in layers]
        for r, ok in zip(rows, shown):
            masks[r[2]][r[3]] = ok
        for layer, mask in zip(layers, masks):
            current = _text_mask(layer)
            if current is None or not np.array_equal(current, mask):
                colors = np.where(mask[:, None], _TEXT_RGBA, _HIDDEN_RGBA)
                layer.text.color = {"array": colors, "default": TEXT_COLOR}


# --------------------------------------------------------------------------------------------
# hover
# --------------------------------------------------------------------------------------------


def hovered_roi(viewer: napari.Viewer, position: Sequence[float]) -> tuple[Any, int] | None:
    """The ROI under a world position.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    position : sequence of float
        World coordinates (napari's ``event.position``).

    Returns
    -------
    (layer, int) or None
        The topmost visible ROI layer with a shape there and the shape's index (deeper
        layers lie above, so the smallest ROI wins), else ``None``.
    """
    for layer in reversed(viewer.layers):
        if layer_kind(layer) != "rois" or not layer.visible or not layer.nshapes:
            continue
        value = layer.get_value(position, world=True)
        index = value[0] if isinstance(value, tuple) else value
        if index is not None and 0 <= int(index) < layer.nshapes:
            return layer, int(index)
    return None


def describe_hovered_roi(viewer: napari.Viewer, position: Sequence[float]) -> str | None:
    """Describe the ROI under the pointer in the active layer's help (napari shows it in the
    status bar); give the layer its own help back once the pointer leaves the ROIs.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    position : sequence of float
        World coordinates of the pointer.

    Returns
    -------
    str or None
        The description shown, ``None`` when no ROI is under ``position``.
    """
    active = viewer.layers.selection.active
    found = hovered_roi(viewer, position)
    text = None
    if found is not None:
        layer, index = found
        row = {k: layer.features[k].iloc[index] for k in layer.features.columns}
        text = roi_description(row)
    if active is None:
        return text
    saved = _HOVER.get(active)
    if text is not None:
        own = saved[0] if saved is not None and active.help == saved[1] else active.help
        _HOVER[active] = (own, text)
        active.help = text
    elif saved is not None:
        if active.help == saved[1]:
            active.help = saved[0]
        del _HOVER[active]
    return text
