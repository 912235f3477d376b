"""Layer updates in place: a new run's results written into the previous run's layers.

Adding a napari layer costs the GUI thread 0.1–0.5 s (layer controls, a vispy visual, its
shaders, a first draw) and removing one a full garbage collection (~0.4 s with torch loaded);
setting a layer's data and style costs a few tens of milliseconds. So a run on a slide that
already shows results *updates* the layers it replaces instead of adding new ones and removing
the old:

* :func:`build_detached` builds the layer that one of :mod:`.layers`' ``add_*`` functions
  would add — through a :class:`DetachedViewer` whose ``add_image`` / ``add_shapes`` /
  ``add_labels`` return standalone layers — so the styling stays defined in one place;
* :func:`write_into` writes that layer's data and state into the existing layer (public
  ``Layer.as_layer_data_tuple`` and property setters, only what changed); the layer's name,
  visibility and opacity stay the user's; :func:`refresh_display` then lets the viewer's
  result display (label layout, colour bar, legend) catch up;
* :func:`snapshot` keeps what a layer showed before, for :func:`write_into` to put back when
  the run is cancelled or fails;
* :func:`reusable_layer` finds the layer a step replaces (same slide, kind, magnifying layer
  and layer type).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from .layer_kinds import KEY, is_kept, layer_id, layer_info, layers_of

#: State written in place after the data, by layer type (name, visibility, opacity are kept).
STATE_KEYS = {
    "image": (
        "scale",
        "translate",
        "metadata",
        "blending",
        "colormap",
        "contrast_limits",
        "gamma",
        "interpolation2d",
    ),
    "shapes": (
        "scale",
        "translate",
        "metadata",
        "blending",
        "features",
        "feature_defaults",
        "text",
        "edge_color",
        "face_color",
        "edge_width",
        "z_index",
    ),
    "labels": ("scale", "translate", "metadata", "blending", "colormap", "features"),
}


_SCRATCH: list = []  # one viewer model (no Qt), made on first use


def _scratch_viewer() -> Any:
    if not _SCRATCH:
        from napari.components import ViewerModel

        _SCRATCH.append(ViewerModel(title="napari-magnet scratch"))
    return _SCRATCH[0]


class DetachedViewer:
    """A stand-in for a viewer whose ``add_*`` methods build layers without adding them.

    Any other attribute is that of a scratch :class:`napari.components.ViewerModel` (no Qt,
    never shown, its layer list always empty): what a layer function does to "its viewer"
    besides adding the layer (wiring callbacks, a colour bar, a text overlay) lands there, not
    on the real viewer. :func:`refresh_display` then updates the real one.
    """

    def __init__(self) -> None:
        self._scratch = _scratch_viewer()
        self.built: list = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scratch, name)

    def _keep(self, layer: Any) -> Any:
        self.built.append(layer)
        return layer

    def add_image(self, data: Any, **kwargs: Any) -> Any:
        """A standalone :class:`napari.layers.Image`."""
        from napari.layers import Image

        return self._keep(Image(data, **kwargs))

    def add_shapes(self, data: Any = None, **kwargs: Any) -> Any:
        """A standalone :class:`napari.layers.Shapes`."""
        from napari.layers import Shapes

        return self._keep(Shapes(data, **kwargs))

    def add_labels(self, data: Any, **kwargs: Any) -> Any:
        """A standalone :class:`napari.layers.Labels`."""
        from napari.layers import Labels

        return self._keep(Labels(data, **kwargs))

    def add_layer(self, layer: Any) -> Any:
        """``layer`` itself (not added)."""
        return self._keep(layer)


def refresh_display(viewer: Any) -> None:
    """Let the viewer's result display (:mod:`.roi_display`: label layout, colour bar,
    coverage legend) catch up with layers written in place (it follows additions, removals,
    zoom and visibility by itself)."""
    try:
        from .roi_display import refresh
    except ImportError:  # pragma: no cover - no such display
        return
    refresh(viewer)


def build_detached(make: Callable[[Any], Any]) -> Any:
    """The layer ``make(viewer)`` would add to a viewer, built without adding it anywhere.

    Parameters
    ----------
    make : callable
        ``make(viewer) -> layer``, e.g. ``lambda v: add_attention_layer(v, ...)``.

    Returns
    -------
    napari.layers.Layer
        A layer in no viewer.
    """
    return make(DetachedViewer())


def _type_name(layer: Any) -> str:
    return type(layer).__name__.lower()


def snapshot(layer: Any) -> tuple:
    """What ``layer`` shows now, as a layer data tuple :func:`write_into` can put back.

    Metadata and features are copied (they may be edited in place afterwards).
    """
    data, state, kind = layer.as_layer_data_tuple()
    state = dict(state)
    state["metadata"] = copy.deepcopy(dict(state.get("metadata", {})))
    if "features" in state:
        state["features"] = state["features"].copy()
    if kind == "shapes":
        data = [d.copy() for d in data]
    return data, state, kind


def write_into(target: Any, source: Any) -> Any:
    """Write ``source`` (a layer, or a layer data tuple) into ``target`` in place.

    Parameters
    ----------
    target : napari.layers.Layer
        The layer in the viewer.
    source : napari.layers.Layer or tuple
        A layer of the same type (see :func:`build_detached`) or ``(data, state, type)``
        (see :func:`snapshot`).

    Returns
    -------
    napari.layers.Layer
        ``target``.

    Raises
    ------
    TypeError
        ``source`` is not of ``target``'s type.
    """
    data, state, kind = source if isinstance(source, tuple) else source.as_layer_data_tuple()
    if kind != _type_name(target):
        raise TypeError(f"cannot write a {kind} layer into a {_type_name(target)} layer")
    if kind == "shapes":
        shape_types = list(state.get("shape_type", ["rectangle"] * len(data)))
        # (vertices, type) pairs: the types of the new shapes, not the old ones
        target.data = list(zip(data, shape_types))
    else:
        target.data = data
    current = target.as_layer_data_tuple()[1]
    for key in STATE_KEYS.get(kind, ("scale", "translate", "metadata")):
        # every setter refreshes the layer (a Shapes layer re-rasterises its thumbnail): only
        # what changed is set
        if key in state and (key == "metadata" or not same(current.get(key), state[key])):
            setattr(target, key, state[key])
    return target


def same(a: Any, b: Any) -> bool:
    """Whether two layer state values are equal (arrays, data frames, dicts, models); ``False``
    when they cannot be compared."""
    try:
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if hasattr(a, "equals") and hasattr(b, "equals"):  # data frames
            return bool(a.equals(b))
        if isinstance(a, (np.ndarray, list, tuple)) or isinstance(b, (np.ndarray, list, tuple)):
            x, y = np.asarray(a), np.asarray(b)
            return x.shape == y.shape and x.dtype.kind == y.dtype.kind and bool(np.all(x == y))
        return bool(a == b)
    except Exception:  # noqa: BLE001 - not comparable: set it
        return False


def reusable_layer(
    viewer: Any,
    slide_path: str,
    kind: str,
    layer_type: str,
    *,
    layer_no: int | None = None,
    exclude: Iterable[Any] = (),
) -> Any:
    """The topmost layer of ours that a new run's layer may be written into, or ``None``.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_path : str
        The slide.
    kind : str
        Our kind (``"attention"``, ``"rois"``, ``"coverage"``).
    layer_type : str
        napari's layer type (``"image"``, ``"shapes"``, ``"labels"``).
    layer_no : int, optional
        The magnifying layer it must show.
    exclude : iterable of layers
        Layers already taken (the new run's own). Kept reviewed layers
        (:func:`~.layer_kinds.is_kept`) are never reused.
    """
    taken = {layer_id(layer) for layer in exclude}
    for layer in reversed(layers_of(viewer, slide_path, kinds=(kind,))):
        if layer_id(layer) in taken or _type_name(layer) != layer_type or is_kept(layer):
            continue
        if getattr(layer, "multiscale", False) or layer.ndim != 2:
            continue
        if layer_no is not None and layer_info(layer).get("layer") != layer_no:
            continue
        return layer
    return None


def mark_committed(layer: Any) -> None:
    """Record in ``layer``'s metadata that its run completed (the autosave keeps its ROIs)."""
    info = layer.metadata.get(KEY)
    if isinstance(info, dict):
        info["committed"] = True


def show_layer(
    viewer: Any,
    make: Callable[[Any], Any],
    run: Any,
    kind: str,
    layer_type: str,
    layer_no: int | None = None,
    *,
    reuse: bool = True,
    defer: Callable[[Callable[[], Any]], None] | None = None,
) -> Any:
    """The layer ``make(viewer)`` adds — or, with ``reuse``, that layer written into the
    :func:`reusable_layer` of ``run``'s slide when there is one.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    make : callable
        ``make(viewer) -> layer`` (one of :mod:`.layers`' ``add_*`` functions).
    run : MagnifyRun
        The run: its ``slide_path``, its ``layers`` (never reused) and its ``reused`` list, to
        which ``[layer, previous]`` is appended for a layer written into (``previous``: its
        :func:`snapshot` once written, ``None`` until then).
    kind, layer_type, layer_no
        Which layer may be reused (see :func:`reusable_layer`).
    reuse : bool
        Whether to write into an existing layer.
    defer : callable, optional
        ``defer(write)`` runs the write into the existing layer later (in the next turn of the
        event loop: building the new layer's state and writing it are then two shorter turns);
        by default it is written at once.

    Returns
    -------
    napari.layers.Layer
        The layer showing the data (added, or updated in place).
    """
    from .layer_queue import keep_selection

    if reuse:
        target = reusable_layer(
            viewer, run.slide_path, kind, layer_type, layer_no=layer_no, exclude=run.layers
        )
        if target is not None:
            fresh = build_detached(make)
            entry = [target, None]  # its previous content, once written into
            run.reused.append(entry)

            def write() -> Any:
                entry[1] = snapshot(target)
                write_into(target, fresh)
                refresh_display(viewer)
                return target

            if defer is None:
                return write()
            defer(write)
            return target
    with keep_selection(viewer):
        return make(viewer)


def remove_layers(viewer: Any, layers: Iterable[Any]) -> None:
    """Remove ``layers`` from ``viewer`` in one batch (napari runs its full garbage collection
    once per batch instead of once per layer)."""
    viewer_layers = viewer.layers
    layers = [layer for layer in layers if layer in viewer_layers]
    if not layers:
        return  # (an empty batch still runs napari's garbage collection)
    batch = getattr(viewer_layers, "batched_update", None)  # napari >= 0.5.5
    with batch() if batch is not None else contextlib.nullcontext():
        for layer in layers:
            viewer_layers.remove(layer)


def discard_later(viewer: Any, layers: list, reused: list) -> Callable[[], None] | None:
    """Hide the ``layers`` a run added now; return the operation for a later turn of the event
    loop that puts back the previous content of the layers it ``reused`` and removes the added
    ones in one batch (``None`` when there is nothing to do).

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    layers : list
        The run's layers (added, or updated in place).
    reused : list of [layer, tuple or None]
        The layers it updates and their previous content (:func:`snapshot`; ``None``: not
        written into yet, nothing to put back).
    """
    taken = {layer_id(layer) for layer, _ in reused}
    added = [lyr for lyr in layers if layer_id(lyr) not in taken and lyr in viewer.layers]
    restore = [(layer, previous) for layer, previous in reversed(reused) if previous is not None]
    for layer in added:
        layer.visible = False
    if not (added or restore):
        return None

    def discard() -> None:
        for layer, previous in restore:
            with contextlib.suppress(Exception):  # e.g. the layer was removed meanwhile
                write_into(layer, previous)
        remove_layers(viewer, added)

    return discard


def stack_run_layers(viewer: Any, slide_path: str) -> None:
    """Restack the slide's layers of ours after a step was shown: the ROI layers above every
    attention overlay (a deeper layer's maps cover its parents' boxes) in lineage order —
    kept reviewed layers lowest, then L1 … Lk, so a layer added beside reused deeper ones
    does not land on top of them — and the user's drawing layers on top."""
    layers = viewer.layers
    overlays = layers_of(viewer, slide_path, kinds=("attention",))
    top = max((layers.index(layer) for layer in overlays), default=-1)
    rois = sorted(layers_of(viewer, slide_path, kinds=("rois",)), key=layers.index)

    def lineage(layer: Any) -> tuple:
        depth = layer_info(layer).get("layer")
        kept = is_kept(layer)
        return (not kept, 0 if kept or not isinstance(depth, int) else depth, layers.index(layer))

    wanted = sorted(rois, key=lineage)
    if wanted != rois or any(layers.index(layer) < top for layer in rois):
        for layer in wanted:  # bottom to top
            layers.move(layers.index(layer), len(layers))
    for layer in layers_of(viewer, slide_path, kinds=("annotations",)):
        i = layers.index(layer)
        if i != len(layers) - 1:
            layers.move(i, len(layers))
