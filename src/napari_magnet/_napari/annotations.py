"""Review: the per-slide Annotations layer, its autosave and restore (classes, review states
and their keys: :mod:`.review`).

The Annotations layer
---------------------
Each slide gets one Shapes layer "<slide> · Annotations" (metadata kind ``"annotations"``) whose
features table has ``class`` (``""`` = unclassified), ``review`` (``unreviewed`` / ``accepted``
/ ``rejected``) and ``name``. The ROI layers of a Magnify run have the same two columns, so
classes and review states are set the same way on both, from the widget or with keys
(``Shift-A``/``R``/``U`` to accept, reject or unreview, ``Alt-1`` … ``Alt-9`` for a class;
see :mod:`.review`, whose names are importable from here too).

Colours follow class and state: the class colour (QuPath's defaults for Tumor/Normal/Other,
a stable hashed colour otherwise) with a light fill; accepted = bold edge, rejected = thin grey
edge and no fill; ROIs keep their lineage colour until classified. A shape being drawn
already has the colours of the class it will get (:func:`.review.apply_drawing_colors`), not
napari's opaque white fill.

Autosave
--------
:class:`AnnotationAutosaver` writes, 1 s (``delay_ms``) after the last change, the slide's
annotations *and* the ROIs of its last completed run (with their classes and review states)
as QuPath GeoJSON (level-0 pixels, via :mod:`..io.geojson`, ROIs via
:class:`~napari_magnet.io.rois.RoiTable`; written atomically), once there is something of the
user's to keep — a drawn or imported shape, or an ROI classified or reviewed (a Magnify run
alone leaves no file next to the slide); from then on every change is saved, deletions
included. The file is the sidecar ``<slide file>.annotations.geojson`` next to the slide, or
a file of the data dir when that folder is not writable (:mod:`..io.autosave_paths`).
A killed napari loses at most the last ``delay_ms``. :func:`restore_annotations` reads the
newer of the two files back when the slide is opened again: annotations into the Annotations
layer, ROIs into "<slide> · L<k> ROIs" layers (without their attention maps), states included.
ROI layers kept for their reviews when a later run came (:mod:`.kept_reviews`) are saved
with ``kept: n`` in ``properties.napari_magnet`` (and feature ids of their own) and come back
as the same kept "… (reviewed, run n)" layers.
Layers imported onto the slide with the widget's *Import GeoJSON…* are saved too and come back
merged into the Annotations layer. Removing a layer is not itself a change the autosave
reacts to (the file keeps its shapes until the next change of the slide's other layers).
"""

from __future__ import annotations

import os
import uuid
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, QTimer

from ..io.annotation import FEATURE_ID_NAMESPACE, PROPERTIES_KEY, Annotation, GeoJSONError
from ..io.autosave_paths import (
    DATA_DIR_ENV,
    SIDECAR_SUFFIX,
    data_dir,
    fallback_path,
    folder_writable,
    save_path,
    saved_path,
    sidecar_path,
)
from ..io.geojson_read import load_geojson
from ..io.geojson_write import write_geojson
from ..io.rois import RoiTable
from ..io.shapes import annotations_to_shapes, shapes_to_annotations
from .kept_reviews import KEPT_KEY, kept_name
from .layers import (
    add_roi_layer,
    edge_width_for,
    layer_info,
    layer_kind,
    layers_of,
    restyle,
    roi_layer_name,
    slide_metadata,
    slide_path_of,
)
from .review import (
    CLASS_KEYS,
    REVIEW_KEYS,
    ClassProvider,
    apply_drawing_colors,
    bind_review_keys,
    default_classes,
    drawing_colors_on_change,
    set_class,
    set_review,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

DEFAULT_DELAY_MS = 1000
#: Layer kinds whose shapes are autosaved (ROIs only once their run completed).
SAVED_KINDS = ("annotations", "imported", "rois")


# --------------------------------------------------------------------------------------------
# building the layers
# --------------------------------------------------------------------------------------------


def annotations_layer_name(slide_layer: Any) -> str:
    """``"<slide layer name> · Annotations"``, the name of a slide's Annotations layer."""
    return f"{slide_layer.name} · Annotations"


def find_annotations_layer(viewer: napari.Viewer, slide_path: str) -> Any:
    """The Annotations layer of the slide ``slide_path`` in ``viewer`` (``None``: none)."""
    found = layers_of(viewer, slide_path, kinds=("annotations",))
    return found[0] if found else None


def add_annotations_layer(
    viewer: napari.Viewer,
    slide_layer: Any,
    annotations: Sequence[Annotation] = (),
    *,
    kind: str = "annotations",
    name: str | None = None,
    classes: ClassProvider = default_classes,
) -> Any:
    """Add a Shapes layer of annotations over a slide, styled, review keys bound.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_layer : napari.layers.Image
        The slide (its metadata gives the mpp).
    annotations : sequence of Annotation
        Level-0 annotations, placed in world µm.
    kind : str
        Our layer kind (metadata).
    name : str, optional
        Layer name (default: :func:`annotations_layer_name`).
    classes : callable
        The class names of the ``Alt-digit`` keys.

    Returns
    -------
    napari.layers.Shapes
        The new layer.
    """
    mpp = slide_layer.metadata.get("mpp")
    shapes = annotations_to_shapes(list(annotations), mpp)
    w0 = edge_width_for(slide_layer)
    meta = slide_metadata(slide_layer, kind, edge_width=w0)
    names = list(classes())
    layer = viewer.add_shapes(
        shapes.data if shapes.data else None,
        shape_type=shapes.shape_types if shapes.data else "rectangle",
        features=shapes.features
        if shapes.data
        else {
            "class": np.array([], dtype=object),
            "review": np.array([], dtype=object),
            "name": np.array([], dtype=object),
        },
        feature_defaults={"class": names[0] if names else "", "review": "unreviewed", "name": ""},
        edge_width=w0,
        name=name or annotations_layer_name(slide_layer),
        metadata=meta,
        **({"units": tuple(slide_layer.units)} if hasattr(slide_layer, "units") else {}),
    )
    bind_review_keys(layer, classes)
    restyle(layer)
    layer.events.data.connect(_restyle_on_add(layer))
    apply_drawing_colors(layer)
    recolor = drawing_colors_on_change(layer)
    layer.events.feature_defaults.connect(recolor)
    layer.events.mode.connect(recolor)
    from .roi_display import install_roi_display

    install_roi_display(viewer)  # ROI labels and hover, also for ROI layers opened from files
    return layer


def _restyle_on_add(layer: Any):
    ref = weakref.ref(layer)

    def on_data(event):
        action = str(getattr(event, "action", ""))
        if action.endswith("added") or action.endswith("ADDED"):
            target = ref()
            if target is not None:
                restyle(target)

    return on_data


def _split_saved(annotations: Sequence[Annotation]) -> tuple[list, dict[tuple[int, int], list]]:
    """The plain annotations, and the ROIs by (kept snapshot or 0, magnifying layer)."""
    plain, rois = [], {}
    for a in annotations:
        ours = a.properties.get(PROPERTIES_KEY) if isinstance(a.properties, dict) else None
        if isinstance(ours, dict) and ours.get("kind") == "roi":
            layer, kept = ours.get("layer", 0), ours.get(KEPT_KEY, 0)
            layer = int(layer) if isinstance(layer, (int, float)) else 0
            kept = int(kept) if isinstance(kept, (int, float)) else 0
            rois.setdefault((kept, layer), []).append(a)
        else:
            plain.append(a)
    return plain, rois


def restore_annotations(
    viewer: napari.Viewer,
    slide_layer: Any,
    *,
    data_dir: str | os.PathLike | None = None,
    classes: ClassProvider = default_classes,
) -> Any:
    """The slide's Annotations layer, created from its autosave when there is one.

    Returns the existing layer when the viewer already has one for this slide. Saved ROIs of
    the last run come back as "<slide> · L<k> ROIs" layers. A saved file that cannot be read
    is reported (``show_error``), kept aside as ``*.unreadable`` so the next autosave does not
    overwrite it, and the layer starts empty.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_layer : napari.layers.Image
        The slide.
    data_dir : path-like, optional
        The autosave's fallback folder.
    classes : callable
        The class names of the ``Alt-digit`` keys.

    Returns
    -------
    napari.layers.Shapes
        The slide's Annotations layer.
    """
    from napari.utils.notifications import show_error

    slide_path = str(slide_layer.metadata["path"])
    existing = find_annotations_layer(viewer, slide_path)
    if existing is not None:
        return existing
    annotations: list[Annotation] = []
    path = saved_path(slide_path, data_dir)
    if path is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                annotations = load_geojson(
                    path, max_extent=slide_layer.metadata["slide"].dimensions
                ).annotations
        except GeoJSONError as exc:
            show_error(
                f"napari-magnet: could not restore the annotations of {slide_layer.name}: {exc}"
            )
            try:
                os.replace(path, path.with_name(path.name + ".unreadable"))
            except OSError:
                pass
            annotations = []
    plain, rois = _split_saved(annotations)
    # kept snapshots first (oldest lowest), the last run's ROIs on top
    for kept, layer_no in sorted(rois, key=lambda key: (key[0] == 0, key)):
        restored = RoiTable.from_annotations(rois[kept, layer_no]).to_layer_data(
            slide_layer.metadata.get("mpp")
        )
        name = roi_layer_name(slide_layer, layer_no)
        roi_layer = add_roi_layer(
            viewer,
            slide_layer,
            restored.rects,
            restored.features,
            layer_no,
            run="restored",
            committed=True,
            name=kept_name(name, kept) if kept else name,
        )
        if kept:
            layer_info(roi_layer)[KEPT_KEY] = kept
        bind_review_keys(roi_layer, classes)
    return add_annotations_layer(viewer, slide_layer, plain, classes=classes)


def layer_annotations(layer: Any) -> list[Annotation]:
    """A Shapes layer of ours (or any Shapes layer over a slide) as level-0 annotations.

    Parameters
    ----------
    layer : napari.layers.Shapes
        An annotations layer (``kind`` annotation) or ROI layer (``kind`` roi, through
        :meth:`~napari_magnet.io.rois.RoiTable.from_layer`).

    Returns
    -------
    list of Annotation
        Its area shapes (lines and paths are left out), with the slide's mpp and name
        recorded; a kept ROI layer's (:mod:`.kept_reviews`) with ``kept: n`` and feature ids
        of their own (the same regions of the last run have the same lineage ids).
    """
    meta = layer.metadata
    kind = "roi" if layer_kind(layer) == "rois" else "annotation"
    anns, _ = shapes_to_annotations(
        layer.data,
        layer.shape_type,
        layer.features,
        meta.get("mpp"),
        scale=tuple(layer.scale),
        translate=tuple(layer.translate),
        kind=kind,
        slide_name=str(meta.get("slide_name", "")),
    )
    kept = layer_info(layer).get(KEPT_KEY) if kind == "roi" else None
    if kept:
        for i, a in enumerate(anns):
            ours = dict(a.properties.get(PROPERTIES_KEY) or {}, **{KEPT_KEY: int(kept)})
            a.properties = {**a.properties, PROPERTIES_KEY: ours}
            a.id = str(uuid.uuid5(FEATURE_ID_NAMESPACE, f"kept:{int(kept)}:{i}:{a.name}"))
    return anns


def collect_annotations(viewer: napari.Viewer, slide_path: str) -> list[Annotation]:
    """What the autosave writes for a slide.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_path : str
        The slide.

    Returns
    -------
    list of Annotation
        The shapes of its annotation layers and the ROIs of its last completed run.
    """
    out: list[Annotation] = []
    for layer in layers_of(viewer, slide_path, kinds=SAVED_KINDS):
        if layer_kind(layer) == "rois" and not layer_info(layer).get("committed"):
            continue
        out.extend(layer_annotations(layer))
    return out


# --------------------------------------------------------------------------------------------
# autosave
# --------------------------------------------------------------------------------------------


class AnnotationAutosaver(QObject):
    """Debounced autosave of one slide's annotations (see the module docstring).

    Parameters
    ----------
    viewer : napari.Viewer
        Held weakly.
    slide_path : str
        The slide (``metadata["path"]`` of its layer).
    data_dir : path-like, optional
        Fallback folder override (else ``$NAPARI_MAGNET_DATA_DIR`` / the user data dir).
    delay_ms : int
        Debounce interval: the file is written this long after the last change.
    """

    def __init__(
        self,
        viewer: napari.Viewer,
        slide_path: str,
        *,
        data_dir: str | os.PathLike | None = None,
        delay_ms: int = DEFAULT_DELAY_MS,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._viewer = weakref.ref(viewer)
        self.slide_path = str(slide_path)
        self.data_dir = data_dir
        self.delay_ms = int(delay_ms)
        self.last_path: Path | None = None
        self.last_error: str | None = None
        self.saves = 0
        self._watched: weakref.WeakSet = weakref.WeakSet()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.save_now)

    @property
    def pending(self) -> bool:
        return self._timer.isActive()

    def watch(self, layer: Any) -> None:
        """Save after changes of ``layer``'s shapes or features."""
        if layer in self._watched:
            return
        self._watched.add(layer)
        layer.events.data.connect(self._on_data)
        layer.events.features.connect(self.schedule)

    def unwatch(self, layer: Any) -> None:
        """Stop saving after changes of ``layer``."""
        if layer not in self._watched:
            return
        self._watched.discard(layer)
        for emitter, cb in (
            (layer.events.data, self._on_data),
            (layer.events.features, self.schedule),
        ):
            try:
                emitter.disconnect(cb)
            except (TypeError, ValueError, RuntimeError):  # pragma: no cover
                pass

    def _on_data(self, event: Any = None) -> None:
        action = str(getattr(event, "action", "")).lower()
        if action.endswith(("adding", "changing", "removing")):
            return  # the matching "-ed" event follows
        self.schedule()

    def schedule(self, *_: Any) -> None:
        """(Re)start the debounce timer."""
        self._timer.start(self.delay_ms)

    def flush(self) -> Path | None:
        """Save now if a save is pending."""
        if self._timer.isActive():
            self._timer.stop()
            return self.save_now()
        return None

    def stop(self) -> None:
        """Stop without saving (the pending change is lost, as if napari were killed)."""
        self._timer.stop()

    def save_now(self) -> Path | None:
        """Write the slide's annotations (atomically).

        Errors are reported with ``show_error`` and kept in :attr:`last_error`.

        Returns
        -------
        Path or None
            The file, or ``None`` when there was nothing to save or the save failed.
        """
        from napari.utils.notifications import show_error

        viewer = self._viewer()
        if viewer is None:
            return None
        try:
            annotations = collect_annotations(viewer, self.slide_path)
        except Exception as exc:  # noqa: BLE001 - a save must never take the viewer down
            self.last_error = f"cannot collect annotations: {exc}"
            show_error(f"napari-magnet autosave: {self.last_error}")
            return None
        target = save_path(self.slide_path, self.data_dir)
        if saved_path(self.slide_path, self.data_dir) is None and not any(
            _is_user_content(a) for a in annotations
        ):
            return None  # nothing drawn or reviewed yet: leave no file next to the slide
        candidates = [target]
        fallback = fallback_path(self.slide_path, self.data_dir)
        if target != fallback:
            candidates.append(fallback)
        error = None
        for path in candidates:
            try:
                write_geojson(path, annotations)
            except (OSError, GeoJSONError) as exc:
                error = f"{path}: {exc}"
                continue
            self.last_path, self.last_error = path, None
            self.saves += 1
            return path
        self.last_error = error
        show_error(f"napari-magnet autosave failed: {error}")
        return None


def _is_user_content(annotation: Annotation) -> bool:
    """A drawn/imported annotation, or an ROI someone classified or reviewed."""
    ours = (
        annotation.properties.get(PROPERTIES_KEY)
        if isinstance(annotation.properties, dict)
        else None
    )
    if not (isinstance(ours, dict) and ours.get("kind") == "roi"):
        return True
    return bool(annotation.classification) or annotation.review != "unreviewed"


def watch_slide_layers(autosaver: AnnotationAutosaver, viewer: napari.Viewer) -> None:
    """Watch every saved layer of the autosaver's slide currently in the viewer.

    Parameters
    ----------
    autosaver : AnnotationAutosaver
        The slide's autosaver.
    viewer : napari.Viewer
        The viewer.
    """
    for layer in layers_of(viewer, autosaver.slide_path, kinds=SAVED_KINDS):
        autosaver.watch(layer)


def slide_of_layer(viewer: napari.Viewer, layer: Any) -> Any:
    """The slide layer a layer of ours belongs to.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    layer : napari.layers.Layer
        A layer of ours.

    Returns
    -------
    napari.layers.Image or None
        The slide layer, ``None`` when it is not in the viewer.
    """
    from .layers import is_slide_layer

    path = slide_path_of(layer)
    for candidate in viewer.layers:
        if is_slide_layer(candidate) and slide_path_of(candidate) == path:
            return candidate
    return None


__all__ = [
    "AnnotationAutosaver",
    "CLASS_KEYS",
    "DATA_DIR_ENV",
    "REVIEW_KEYS",
    "SIDECAR_SUFFIX",
    "add_annotations_layer",
    "apply_drawing_colors",
    "bind_review_keys",
    "collect_annotations",
    "data_dir",
    "fallback_path",
    "find_annotations_layer",
    "folder_writable",
    "layer_annotations",
    "restore_annotations",
    "save_path",
    "saved_path",
    "set_class",
    "set_review",
    "sidecar_path",
]
