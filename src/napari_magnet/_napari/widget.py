"""The Magnify dock widget: run a model on a slide, review what it looked at, export.

``add_magnify_widget(viewer)`` docks it (the demo uses this); napari's Plugins menu builds
:class:`MagnifyWidget` from the manifest.

The widget is a composition:

* :class:`~.run_controller.RunController` (plain): the run state machine, the worker thread,
  the model cache and the queue that adds a run's layers one per event-loop turn — see
  :mod:`.run_controller` for Cancel, errors and how a new run replaces the previous one;
* Qt panels (:mod:`._qt`): :class:`~._qt.open_prompt.OpenSlidesPanel` (shown only when it
  has something to offer: reopen a slide another reader opened, make napari-magnet napari's
  reader for slides — see :mod:`.open_routes`), :class:`~._qt.MagnifyPanel` (slide and its
  slide line, model, device, patches, Magnify/Cancel, progress), :class:`~._qt.ReviewPanel`
  (classes, review states) and :class:`~._qt.ExportPanel` (*Export all…*, *Import GeoJSON…*);
* the slides' annotation layers and their autosave (:mod:`.annotations`), kept here.

They talk through frozen records: the panel's :class:`~._qt.RunSettings`, the run's
:class:`~.run_worker.RunRequest`, the worker's records and the controller's
:class:`~.run_controller.RunStatus`. The widget keeps the panels' controls and methods as
its own attributes (``model_combo``, ``set_review``, ``export_all`` …).

**Docking** narrows the canvas: once shown, the widget fits the view to the slides (as Home
does) when the view was fitted before, so a slide is not left cropped. The panels sit in a
vertical scroll area (:mod:`._qt.scroll_area`): in a short window the dock scrolls instead of
squeezing the panels, so every line stays readable.

**Closing**: when the widget is destroyed (its window closed, napari quitting) at any moment —
a run under way, a cancelled run's worker still stopping — it first writes pending autosaves,
then silences its run controller (:meth:`~.run_controller.RunController.shutdown`: nothing
reaches the deleted panels any more), stops listening to the viewer and waits a moment
(:data:`STOP_WAIT_S`) for the worker thread to end.

**Magnify inside a box**: a shape selected in a Shapes layer that is not one of our ROI layers
(the active layer first) restricts layer 1 to its bounding box (world µm → level-0 pixels
through both layers' scale and translate).
"""

from __future__ import annotations

import time
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QApplication, QVBoxLayout, QWidget

from ._qt import ExportPanel, MagnifyPanel, ReviewPanel
from ._qt.open_prompt import OpenSlidesPanel
from ._qt.scroll_area import VerticalScrollArea
from .annotations import (
    AnnotationAutosaver,
    bind_review_keys,
    restore_annotations,
    watch_slide_layers,
)
from .layers import is_slide_layer, layers_of, selected_box, slide_layers, slide_path_of
from .open_routes import foreign_slide_layers, foreign_slide_path, slide_line, view_is_fitted
from .run_controller import MagnifyRun, RunController, RunState, RunStatus
from .run_worker import (
    RunRequest,
    avoid_triton_llvm_clash,
    cuda_status,
    demo_available,
    load_model_cached,
    model_choices,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

#: seconds after the widget is first shown during which layout changes refit the view
FIT_WINDOW_S = 1.0
#: seconds the widget, when destroyed, waits for a worker to reach its next step boundary
STOP_WAIT_S = 3.0

# the helpers below are re-exported for the demo, the benchmarks and the tests
__all__ = [
    "MagnifyRun",
    "MagnifyWidget",
    "RunState",
    "RunStatus",
    "add_magnify_widget",
    "avoid_triton_llvm_clash",
    "cuda_status",
    "demo_available",
    "load_model_cached",
    "model_choices",
]


class _Forward:
    """An attribute of one of the widget's parts, read through the widget."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(getattr(obj, self.part), self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class MagnifyWidget(QWidget):
    """Magnify, review and export (see the module docstring).

    Parameters
    ----------
    napari_viewer : napari.Viewer
        The viewer (napari passes it when building the widget from the manifest).
    data_dir : path-like, optional
        Fallback folder of the annotation autosave (default ``$NAPARI_MAGNET_DATA_DIR`` or
        ``platformdirs.user_data_dir("napari-magnet")``).
    autosave_delay_ms : int
        Debounce of the autosave.
    parent : QWidget, optional
        Parent widget.

    Signals
    -------
    step_shown(int)
        A step's layers are all in the viewer (the magnifying layer's number).
    run_finished(str)
        A run ended: ``"committed"``, ``"cancelled"`` or ``"failed"``.
    """

    step_shown = Signal(int)
    run_finished = Signal(str)

    # the Magnify panel
    slide_combo = _Forward("magnify_panel")
    slide_info_label = _Forward("magnify_panel")
    model_combo = _Forward("magnify_panel")
    device_combo = _Forward("magnify_panel")
    patches_spin = _Forward("magnify_panel")
    region_label = _Forward("magnify_panel")
    magnify_button = _Forward("magnify_panel")
    cancel_button = _Forward("magnify_panel")
    progress = _Forward("magnify_panel")
    result_label = _Forward("magnify_panel")
    model_spec = _Forward("magnify_panel")
    set_model = _Forward("magnify_panel")
    set_device = _Forward("magnify_panel")
    # the Review panel
    classes = _Forward("review_panel")
    classes_edit = _Forward("review_panel")
    class_combo = _Forward("review_panel")
    set_class_button = _Forward("review_panel")
    review_label = _Forward("review_panel")
    set_classes = _Forward("review_panel")
    set_review = _Forward("review_panel")
    set_class = _Forward("review_panel")
    # the Export panel
    export_button = _Forward("export_panel")
    import_button = _Forward("export_panel")
    export_all = _Forward("export_panel")
    import_geojson = _Forward("export_panel")
    # the run controller
    is_running = _Forward("controller")
    current_run = _Forward("controller")
    last_runs = _Forward("controller")
    remove_layers_later = _Forward("controller")

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        *,
        data_dir: Any = None,
        autosave_delay_ms: int = 1000,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.data_dir = data_dir
        self.autosave_delay_ms = int(autosave_delay_ms)
        self.autosavers: dict[str, AnnotationAutosaver] = {}
        # fit the view once docked (the dock narrows the canvas) unless the user had moved it
        self._fit_after_dock = view_is_fitted(napari_viewer)
        self._fit_until = 0.0
        self._fit_timer = QTimer(self)
        self._fit_timer.setSingleShot(True)
        self._fit_timer.setInterval(0)
        self._fit_timer.timeout.connect(self._fit_view)

        self.controller = RunController(napari_viewer)
        self.open_panel = OpenSlidesPanel(napari_viewer, self)
        self.magnify_panel = MagnifyPanel(self)
        self.review_panel = ReviewPanel(napari_viewer, self)
        self.export_panel = ExportPanel(
            napari_viewer,
            slide_layer=lambda: self.slide_layer,
            last_run=self.controller.last_runs.get,
            classes=self.review_panel.class_names,
            on_imported=self._on_imported,
            parent=self,
        )
        panels = QWidget()
        column = QVBoxLayout(panels)
        for panel in (self.open_panel, self.magnify_panel, self.review_panel, self.export_panel):
            column.addWidget(panel)
        column.addStretch(1)
        self.scroll_area = VerticalScrollArea(panels)
        root = QVBoxLayout(self)
        root.setContentsMargins(0, 0, 0, 0)
        root.addWidget(self.scroll_area)

        self.magnify_panel.magnify_clicked.connect(self.run_magnify)
        self.magnify_panel.cancel_clicked.connect(self.cancel)
        self.controller.status_changed.connect(self.magnify_panel.show_status)
        self.controller.step_shown.connect(self._forward_step_shown)
        self.controller.run_finished.connect(self._forward_run_finished)
        self.controller.roi_layer_added.connect(self._bind_keys)
        self.controller.committed.connect(self._on_committed)
        self.magnify_panel.show_status(self.controller.status)
        self.magnify_panel.slide_changed.connect(self._update_slide_line)

        self._refresh_slides()
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._on_layer_removed)
        for layer in slide_layers(self.viewer):
            self._setup_slide(layer)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)
        # not a method of ours (it runs while the C++ side is being deleted), holding no
        # strong reference to the widget
        listeners = [
            (layers.events.inserted, weakref.WeakMethod(self._on_layer_inserted)),
            (layers.events.removed, weakref.WeakMethod(self._on_layer_removed)),
        ]
        self.destroyed.connect(partial(_on_destroyed, self.controller, self.autosavers, listeners))

    # -- runs ------------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        """The run controller's state."""
        return self.controller.state

    def set_checkpoint(self, path: str) -> None:
        """Choose a checkpoint file as the model."""
        self.set_model(str(path))

    def selected_box(self, slide_layer: Any = None) -> tuple | None:
        """Level-0 box of the shapes selected in a Shapes layer that is not an ROI layer (the
        active layer first), or ``None``."""
        slide_layer = slide_layer or self.slide_layer
        if slide_layer is None:
            return None
        return selected_box(self.viewer, slide_layer)

    def run_magnify(self) -> Any:
        """Start a run on the current slide with the chosen model/device (the Magnify
        button); returns the worker, or ``None`` when nothing was started."""
        from napari.utils.notifications import show_error

        if self.controller.state is not RunState.IDLE:
            return None
        avoid_triton_llvm_clash()
        slide_layer = self.slide_layer
        if slide_layer is None:
            show_error("napari-magnet: open a slide first (File > Open, or drag a slide in)")
            return None
        settings = self.magnify_panel.settings()
        if settings is None:
            return None
        box = self.selected_box(slide_layer)
        self.magnify_panel.show_region(box)
        mpp = slide_layer.metadata.get("mpp")
        request = RunRequest(
            slide=slide_layer.metadata["slide"],
            slide_path=slide_path_of(slide_layer),
            mpp=(float(mpp[0]), float(mpp[1])) if mpp else None,
            model=settings.model,
            device=settings.device,
            box=box,
            n_patches=settings.n_patches,
        )
        return self.controller.start(slide_layer, request)

    def cancel(self) -> None:
        """Cancel the run at once: its layers go, earlier results are put back, the widget is
        idle; the worker stops by itself at its next step boundary."""
        self.controller.cancel()

    def _forward_step_shown(self, n: int) -> None:
        self.step_shown.emit(n)

    def _forward_run_finished(self, outcome: str) -> None:
        self.run_finished.emit(outcome)

    def _bind_keys(self, layer: Any) -> None:
        bind_review_keys(layer, self.review_panel.class_names)

    def _on_committed(self, run: MagnifyRun) -> None:
        saver = self.autosavers.get(run.slide_path)
        if saver is not None:
            watch_slide_layers(saver, self.viewer)
            saver.schedule()

    # -- slides ----------------------------------------------------------------------------
    @property
    def slide_layer(self) -> Any:
        """The slide layer chosen in the Magnify panel (``None`` without slides)."""
        layer = self.magnify_panel.current_slide()
        if layer is not None and layer in self.viewer.layers:
            return layer
        return None

    def set_slide(self, layer: Any) -> None:
        """Choose the slide layer ``layer``.

        Raises
        ------
        ValueError
            It is not a slide layer of the viewer.
        """
        self.magnify_panel.select_slide(layer)

    def _refresh_slides(self) -> None:
        self.magnify_panel.set_slides(slide_layers(self.viewer))
        self._update_slide_line()

    def _update_slide_line(self) -> None:
        layer = self.slide_layer
        foreign = () if layer is not None else foreign_slide_layers(self.viewer)
        self.magnify_panel.show_slide_info(slide_line(layer, foreign))

    def _on_layer_inserted(self, event: Any) -> None:
        layer = event.value
        if is_slide_layer(layer):
            self._refresh_slides()
            self.set_slide(layer)
            # not from inside the insertion event: add layers once it has completed
            QTimer.singleShot(0, partial(self._setup_slide_ref, weakref.ref(layer)))
        elif foreign_slide_path(layer):
            self._update_slide_line()

    def _setup_slide_ref(self, ref: Any) -> None:
        layer = ref()
        if layer is not None and layer in self.viewer.layers:
            self._setup_slide(layer)

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        if not is_slide_layer(layer):
            if foreign_slide_path(layer):
                self._update_slide_line()
            return
        path = slide_path_of(layer)
        self.controller.slide_removed(layer)
        saver = self.autosavers.get(path)
        if saver is not None and not any(
            slide_path_of(s) == path for s in slide_layers(self.viewer)
        ):
            saver.flush()
        self._refresh_slides()

    def _setup_slide(self, slide_layer: Any) -> Any:
        """Restore (or create) the slide's Annotations layer and start its autosave."""
        path = slide_path_of(slide_layer)
        classes = self.review_panel.class_names
        try:
            layer = restore_annotations(
                self.viewer, slide_layer, data_dir=self.data_dir, classes=classes
            )
        except Exception as exc:  # noqa: BLE001 - the viewer must survive
            from napari.utils.notifications import show_error

            show_error(f"napari-magnet: cannot set up annotations for {slide_layer.name}: {exc}")
            return None
        self.review_panel.apply_feature_defaults(layer)
        saver = self.autosavers.get(path)
        if saver is None:
            saver = AnnotationAutosaver(
                self.viewer,
                path,
                data_dir=self.data_dir,
                delay_ms=self.autosave_delay_ms,
                parent=self,
            )
            self.autosavers[path] = saver
        watch_slide_layers(saver, self.viewer)
        for roi in layers_of(self.viewer, path, kinds=("rois",)):
            bind_review_keys(roi, classes)
        return layer

    def annotations_layer(self, slide_layer: Any = None) -> Any:
        """The Annotations layer of a slide (default: the current one), created if needed."""
        slide_layer = slide_layer or self.slide_layer
        if slide_layer is None:
            return None
        found = layers_of(self.viewer, slide_path_of(slide_layer), kinds=("annotations",))
        return found[0] if found else self._setup_slide(slide_layer)

    def _on_imported(self, layer: Any) -> None:
        self.review_panel.apply_feature_defaults(layer)
        saver = self.autosavers.get(str(slide_path_of(layer)))
        if saver is not None:
            saver.watch(layer)
            saver.schedule()

    # -- docking ---------------------------------------------------------------------------
    def showEvent(self, event: Any) -> None:
        """On the first show (docking), fit the view to the slides once the canvas has its
        new size (unless the user had moved the view before)."""
        super().showEvent(event)
        if self._fit_after_dock:
            self._fit_after_dock = False
            self._fit_until = time.monotonic() + FIT_WINDOW_S
            self._fit_timer.start()

    def resizeEvent(self, event: Any) -> None:
        """While docking settles, each new size (the canvas's changes with it) refits."""
        super().resizeEvent(event)
        if time.monotonic() < self._fit_until:
            self._fit_timer.start()

    def _fit_view(self) -> None:
        self.viewer.reset_view()

    # -- shutdown --------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Write pending autosaves and stop the run controller for good (napari quits):
        a run under way is dropped, its worker asked to stop and waited for a moment."""
        _stop(self.controller, self.autosavers.values())


def _stop(controller: RunController, savers: Any) -> None:
    """Flush the autosaves, then shut the controller down (waiting up to STOP_WAIT_S)."""
    for saver in list(savers):
        try:
            saver.flush()
        except RuntimeError:  # its timer is already deleted: nothing is pending any more
            pass
    controller.shutdown(wait_s=STOP_WAIT_S)


def _on_destroyed(controller: RunController, savers: dict, listeners: list, *_: Any) -> None:
    """The widget is being destroyed: stop listening to the viewer, then :func:`_stop`."""
    for emitter, ref in listeners:
        callback = ref()
        if callback is not None:
            emitter.disconnect(callback)
    _stop(controller, savers.values())


def add_magnify_widget(viewer: napari.Viewer, **kwargs: Any) -> MagnifyWidget:
    """Dock a :class:`MagnifyWidget` on the right of ``viewer`` and return it.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    **kwargs
        Passed to :class:`MagnifyWidget`.
    """
    widget = MagnifyWidget(viewer, **kwargs)
    viewer.window.add_dock_widget(widget, name="Magnify", area="right")
    return widget
