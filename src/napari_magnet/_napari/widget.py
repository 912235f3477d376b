"""The Magnify dock widget: run a model on a slide, review what it looked at, export.

``add_magnify_widget(viewer)`` docks it (the demo uses this); napari's Plugins menu builds
:class:`MagnifyWidget` from the manifest.

Runs
----
A run is a napari ``thread_worker`` generator around :func:`napari_magnet.magnify`
(:func:`magnify_items`): the model is loaded, the tissue mask read, and every step's layer
data — ROI rectangles, the composite attention raster, the coverage grid — computed in the
worker, so the GUI thread only creates layers and the viewer stays responsive. Each
``MagnifyStep`` is shown as soon as it arrives (the worker's ``yielded`` signal): its attention
overlay, then its ROI rectangles (see :mod:`.layers`), each added in its own turn of the event
loop; the coverage overlay ("<slide> · coverage", hidden; the result line reports the
examined fraction) is added when the run completes.

* **Cancel** sets the run's cancel flag and at once hides every layer of the run (they are
  removed in the next turn of the event loop, in one batch); the worker stops at the next step
  boundary: the generator checks the flag each time it is resumed and closes the ``magnify``
  stream itself, in the worker thread (``worker.quit()`` would leave the stream suspended until
  garbage collection in another thread, with its region-reading pool and torch's thread-local
  inference mode still open). Steps that arrive after Cancel are dropped; nothing of the run
  stays. Magnify is enabled again once the worker has finished.
* A failed run (bad checkpoint, CUDA out of memory, unreadable region — any exception in the
  worker) is reported with ``show_error``; its partial layers are removed and earlier results
  stay.
* **A new run on a slide replaces the previous run's layers when it completes**: until then
  both are shown (napari suffixes the new names with " [1]"); on completion the old ROI,
  attention and coverage layers are removed and the new ones take the plain names. A
  cancelled or failed run therefore leaves the previous results untouched.
* **Magnify inside a box**: a shape selected in a Shapes layer that is not one of our ROI
  layers (the active layer first) restricts layer 1 to its bounding box (world µm → level-0
  pixels through both layers' scale and translate).
* Layers are added without becoming the active layer, so the user's selection (e.g. the
  Annotations layer being drawn in) stays, and the slide's Annotations layer is kept on top.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..io.geojson import DEFAULT_CLASSES
from ..io.layerdata import (
    coverage_grid_shape,
    coverage_summary,
    resize_mask,
    step_layer_data,
    tissue_mask,
)
from .annotations import (
    AnnotationAutosaver,
    add_annotations_layer,
    bind_review_keys,
    layer_annotations,
    restore_annotations,
    set_class,
    set_review,
    watch_slide_layers,
)
from .layers import (
    KEY,
    add_attention_layer,
    add_roi_layer,
    base_name,
    is_slide_layer,
    layer_info,
    layer_kind,
    layers_of,
    set_coverage_layer,
    slide_layers,
    slide_path_of,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

PREFERRED_ORDER = ("magnet3", "magnet4", "magnet3-lite", "ats")
CHECKPOINT_ITEM = "Checkpoint file…"
_CHECKPOINT_SENTINEL = "__checkpoint__"
RUN_KINDS = ("rois", "attention", "coverage")
#: Cells along the longer side of the coverage grid.
COVERAGE_GRID = 512
#: Pause between two queued layer operations: a zero-delay timer would run them back to back
#: before other timers (and user input) get their turn.
DRAIN_DELAY_MS = 5
_run_ids = itertools.count(1)

# models loaded once per (spec, device) and reused by later runs (never holds viewer objects)
_MODEL_CACHE: dict[tuple[str, str], Any] = {}
_MODEL_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# model helpers (torch imported lazily)
# --------------------------------------------------------------------------------------------


def avoid_triton_llvm_clash() -> bool:
    """Keep torch from importing ``triton`` once Mesa's LLVM is loaded in this process.

    napari rendering through Mesa (llvmpipe: Xvfb, VMs, remote desktops) loads
    ``libLLVM``; ``triton`` (pulled in by ``torch._dynamo`` when torchvision is first imported)
    bundles its own LLVM, and loading it next to Mesa's crashes the process (segfault). The
    plugin never compiles with triton, so when ``libLLVM`` is mapped and triton is not yet
    imported, ``sys.modules["triton"] = None`` makes torch see "no triton". Returns whether
    it did so.
    """
    if "triton" in sys.modules:
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            mapped = fh.read()
    except OSError:  # not Linux: no Mesa/LLVM clash known
        return False
    if "libLLVM" not in mapped:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def demo_available() -> bool:
    """Whether ``load_model("demo")`` can work: the shipped checkpoint is present."""
    from ..models.registry import DEMO_CHECKPOINT

    return DEMO_CHECKPOINT.is_file()


def model_choices() -> list[str]:
    """Model names for the combo box: ``demo`` first when shipped, then magnet3, magnet4,
    magnet3-lite, ats, then the other registered names."""
    from ..models.registry import known_models

    names = [n for n in known_models() if n != "demo"]
    ordered = [n for n in PREFERRED_ORDER if n in names]
    ordered += sorted(n for n in names if n not in ordered)
    return (["demo"] if demo_available() else []) + ordered


def cuda_status() -> tuple[bool, str]:
    """(available, reason when not)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return False, f"PyTorch is not importable: {exc}"
    if torch.cuda.is_available():
        return True, ""
    if torch.version.cuda is None:
        return False, "This PyTorch build has no CUDA support (CPU-only build)."
    return False, "PyTorch sees no CUDA device (no GPU, or the driver is missing)."


def model_architecture(spec: str) -> str | None:
    """``"ats"``/``"magnet"`` for a registered name or a checkpoint (read from its JSON
    without loading weights); ``None`` when unknown."""
    if spec.startswith("ats"):
        return "ats"
    if spec.startswith("magnet"):
        return "magnet"
    if spec == "demo":
        from ..models.registry import DEMO_CHECKPOINT

        spec = str(DEMO_CHECKPOINT)
    try:
        from ..models.checkpoints import checkpoint_paths

        meta = json.loads(checkpoint_paths(spec)[1].read_text(encoding="utf-8"))
        arch = meta.get("architecture")
        return str(arch) if arch else None
    except (OSError, ValueError, AttributeError):
        return None


def load_model_cached(spec: str, device: str) -> Any:
    """``load_model(spec, device)``, cached per (spec, device) for named models."""
    from ..models.registry import load_model

    key = (spec, device)
    is_path = (Path(spec).suffix in (".safetensors", ".json") or "/" in spec
               or Path(spec).exists())
    with _MODEL_LOCK:
        if not is_path and key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        model = load_model(spec, device=device)
        if not is_path:
            _MODEL_CACHE[key] = model
        return model


def magnify_items(slide: Any, spec: str, device: str, box: tuple | None,
                  n_patches: int | None, cancel: threading.Event, mpp: Any = None):
    """The worker's generator: ``("model", n_layers, name)``, ``("tissue", mask)``, then
    ``("step", MagnifyStep, StepLayerData)`` … ``("result", MagnifyResult)``; ``("error",
    exc)`` instead of raising. The layer data (ROI rectangles, composite attention, coverage)
    is computed here, off the GUI thread. Stops — closing the magnify stream in this thread —
    as soon as it is resumed with ``cancel`` set."""
    try:
        from ..engine.magnify import magnify
        from ..engine.types import MagnifyResult

        model = load_model_cached(spec, device)
        if getattr(model, "architecture", "") == "magnet":
            n_layers = int(model.num_layers)
        else:
            n_layers = 1
        yield ("model", n_layers, getattr(model, "model_name", spec))
        if cancel.is_set():
            return
        dims = slide.dimensions
        grid = coverage_grid_shape(dims, COVERAGE_GRID)
        tissue = resize_mask(tissue_mask(slide.thumbnail(1024)), grid)
        yield ("tissue", tissue)
        if cancel.is_set():
            return
        stream = magnify(slide, model, device, box=box, n_patches=n_patches)
        steps: list = []
        try:
            for item in stream:
                if cancel.is_set():
                    return
                if isinstance(item, MagnifyResult):
                    yield ("result", item)
                else:
                    steps.append(item)
                    yield ("step", item, step_layer_data(item, mpp, dims, steps, tissue))
                if cancel.is_set():
                    return
        finally:
            stream.close()
    except Exception as exc:  # noqa: BLE001 - reported in the GUI thread
        yield ("error", exc)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed run."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    hint = ""
    if "OutOfMemory" in name or "out of memory" in text.lower():
        hint = " — try the CPU device, or close other GPU programs"
    return f"{name}: {text}{hint}"


# --------------------------------------------------------------------------------------------
# the run record
# --------------------------------------------------------------------------------------------


@dataclass
class MagnifyRun:
    """One Magnify run and the layers it added."""

    id: int
    slide_layer: Any
    slide_path: str
    model: str
    device: str
    box: tuple | None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    layers: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    result: Any = None
    tissue: np.ndarray | None = None
    coverage: np.ndarray | None = None
    coverage_layer: Any = None
    n_layers: int = 0
    cancelled: bool = False
    failed: bool = False
    finished: bool = False  # the worker has stopped
    closed: bool = False  # committed or discarded
    shown: int = 0  # steps whose layers are all in the viewer
    error: str = ""
    started: float = field(default_factory=time.perf_counter)

    @property
    def tag(self) -> str:
        return f"run {self.id}"


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f}"


# --------------------------------------------------------------------------------------------
# the widget
# --------------------------------------------------------------------------------------------


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

    Signals
    -------
    step_shown(int)
        A step's layers are all in the viewer (the magnifying layer's number).
    run_finished(str)
        A run ended: ``"committed"``, ``"cancelled"`` or ``"failed"``.
    """

    step_shown = Signal(int)
    run_finished = Signal(str)

    def __init__(self, napari_viewer: napari.Viewer, *, data_dir: Any = None,
                 autosave_delay_ms: int = 1000, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.data_dir = data_dir
        self.autosave_delay_ms = int(autosave_delay_ms)
        self._worker = None
        self._run: MagnifyRun | None = None
        self._pending: deque = deque()
        self._drain_scheduled = False
        self.last_runs: dict[str, MagnifyRun] = {}
        self.autosavers: dict[str, AnnotationAutosaver] = {}
        self.classes: list[str] = list(DEFAULT_CLASSES)
        self._build()
        self._refresh_slides()
        layers = self.viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self._on_layer_removed)
        for layer in slide_layers(self.viewer):
            self._setup_slide(layer)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    # -- construction --------------------------------------------------------------------
    def _build(self) -> None:
        self._patches_allowed = False
        root = QVBoxLayout(self)

        box = QGroupBox("Magnify")
        form = QFormLayout(box)
        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("Slide layers opened with napari-magnet")
        self.slide_combo.currentIndexChanged.connect(self._update_buttons)
        form.addRow("Slide", self.slide_combo)

        self.model_combo = QComboBox()
        for name in model_choices():
            self.model_combo.addItem(name, name)
        self.model_combo.addItem(CHECKPOINT_ITEM, _CHECKPOINT_SENTINEL)
        self._last_model_index = 0
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        form.addRow("Model", self.model_combo)

        self.device_combo = QComboBox()
        for label, value in (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda")):
            self.device_combo.addItem(label, value)
        ok, reason = cuda_status()
        if not ok:
            item = self.device_combo.model().item(2)
            item.setEnabled(False)
            item.setToolTip(reason)
            self.device_combo.setItemData(2, reason, Qt.ToolTipRole)
        self.device_combo.setToolTip("auto = CUDA when available, else CPU"
                                     + ("" if ok else f"\nCUDA: {reason}"))
        form.addRow("Device", self.device_combo)

        self.patches_spin = QSpinBox()
        self.patches_spin.setRange(0, 100_000)
        self.patches_spin.setSpecialValueText("model default")
        self.patches_spin.setToolTip("Number of patches attention sampling draws, per region "
                                     "for ats-2level (ats models only; MagNet's patches are "
                                     "fixed by its architecture)")
        form.addRow("Patches", self.patches_spin)

        self.region_label = QLabel("Region: whole slide")
        self.region_label.setWordWrap(True)
        self.region_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        self.region_label.setToolTip("Select a rectangle in a Shapes layer (not an ROI layer) "
                                     "to magnify inside it")
        form.addRow(self.region_label)

        buttons = QHBoxLayout()
        self.magnify_button = QPushButton("Magnify")
        self.magnify_button.clicked.connect(self.run_magnify)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        buttons.addWidget(self.magnify_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m layers")
        form.addRow(self.progress)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        # long texts wrap instead of widening the dock (and shrinking the canvas)
        self.result_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        form.addRow(self.result_label)
        root.addWidget(box)

        review = QGroupBox("Review")
        rform = QFormLayout(review)
        self.classes_edit = QLineEdit(", ".join(self.classes))
        self.classes_edit.setToolTip("Annotation classes, comma-separated (Alt-1 … Alt-9 "
                                     "give the selected shapes class 1 … 9)")
        self.classes_edit.editingFinished.connect(self._on_classes_edited)
        rform.addRow("Classes", self.classes_edit)
        crow = QHBoxLayout()
        self.class_combo = QComboBox()
        self.class_combo.addItems(self.classes)
        self.class_combo.setToolTip("Class of new shapes, and of the selected ones with "
                                    "'Set class'")
        self.class_combo.currentTextChanged.connect(self._on_current_class)
        self.set_class_button = QPushButton("Set class")
        self.set_class_button.clicked.connect(lambda: self.set_class(
            self.class_combo.currentText()))
        crow.addWidget(self.class_combo, 1)
        crow.addWidget(self.set_class_button)
        rform.addRow("Class", crow)
        srow = QHBoxLayout()
        for label, state, key in (("Accept", "accepted", "Shift-A"),
                                  ("Reject", "rejected", "Shift-R"),
                                  ("Unreviewed", "unreviewed", "Shift-U")):
            b = QPushButton(label)
            b.setToolTip(f"Mark the selected shapes {state} ({key})")
            b.clicked.connect(lambda _=False, s=state: self.set_review(s))
            srow.addWidget(b)
        rform.addRow(srow)
        self.review_label = QLabel("")
        self.review_label.setWordWrap(True)
        self.review_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        rform.addRow(self.review_label)
        root.addWidget(review)

        export = QGroupBox("Export and import")
        erow = QHBoxLayout(export)
        self.export_button = QPushButton("Export all…")
        self.export_button.setToolTip("rois.geojson, annotations.geojson, attention_L*.ome.tif "
                                      "and result.json into a folder")
        self.export_button.clicked.connect(lambda: self.export_all())
        self.import_button = QPushButton("Import GeoJSON…")
        self.import_button.setToolTip("QuPath or napari-magnet GeoJSON onto the slide")
        self.import_button.clicked.connect(lambda: self.import_geojson())
        erow.addWidget(self.export_button)
        erow.addWidget(self.import_button)
        root.addWidget(export)
        root.addStretch(1)
        self._on_model_changed(self.model_combo.currentIndex())
        self._update_buttons()

    # -- state ---------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        """Whether a run is under way: its worker still running (also while cancelling), its
        layers still being added, or layers of a cancelled or replaced run still being
        removed."""
        return self._worker is not None or self._run is not None or bool(self._pending)

    @property
    def current_run(self) -> MagnifyRun | None:
        return self._run

    @property
    def slide_layer(self) -> Any:
        """The slide layer chosen in the combo box (``None`` without slides)."""
        ref = self.slide_combo.currentData()
        layer = ref() if callable(ref) else None
        if layer is not None and layer in self.viewer.layers:
            return layer
        return None

    def set_slide(self, layer: Any) -> None:
        for i in range(self.slide_combo.count()):
            ref = self.slide_combo.itemData(i)
            if callable(ref) and ref() is layer:
                self.slide_combo.setCurrentIndex(i)
                return
        raise ValueError(f"{getattr(layer, 'name', layer)!r} is not a slide layer here")

    @property
    def model_spec(self) -> str:
        return str(self.model_combo.currentData())

    def set_model(self, spec: str) -> None:
        """Choose a model by name or checkpoint path (added to the list if new)."""
        i = self.model_combo.findData(spec)
        if i < 0:
            if not Path(spec).exists():
                raise ValueError(f"unknown model {spec!r}")
            i = self.model_combo.count() - 1
            self.model_combo.insertItem(i, Path(spec).name, spec)
            self.model_combo.setItemData(i, spec, Qt.ToolTipRole)
        self.model_combo.setCurrentIndex(i)

    def set_checkpoint(self, path: str) -> None:
        self.set_model(str(path))

    def set_device(self, device: str) -> None:
        i = self.device_combo.findData(device)
        if i < 0:
            raise ValueError(f"unknown device {device!r}")
        self.device_combo.setCurrentIndex(i)

    @property
    def _run_active(self) -> bool:
        return self._worker is not None or self._run is not None

    def _update_buttons(self, *_: Any) -> None:
        running = self._run_active
        self.magnify_button.setEnabled(not running and self.slide_layer is not None)
        self.cancel_button.setEnabled(running and self._run is not None
                                      and not self._run.cancelled)
        self.model_combo.setEnabled(not running)
        self.device_combo.setEnabled(not running)
        self.slide_combo.setEnabled(not running)
        self.patches_spin.setEnabled(not running and self._patches_allowed)

    def _on_model_changed(self, index: int) -> None:
        data = self.model_combo.itemData(index)
        if data == _CHECKPOINT_SENTINEL:
            path, _ = QFileDialog.getOpenFileName(
                self, "Choose a checkpoint", "", "Checkpoints (*.safetensors *.json)")
            self.model_combo.blockSignals(True)
            try:
                if path:
                    self.set_model(path)
                else:
                    self.model_combo.setCurrentIndex(self._last_model_index)
            finally:
                self.model_combo.blockSignals(False)
        self._last_model_index = self.model_combo.currentIndex()
        self._patches_allowed = model_architecture(self.model_spec) == "ats"
        if not self._patches_allowed:
            self.patches_spin.setValue(0)
        self.patches_spin.setEnabled(self._patches_allowed and not self.is_running)

    # -- slides --------------------------------------------------------------------------
    def _refresh_slides(self) -> None:
        current = self.slide_layer
        self.slide_combo.blockSignals(True)
        try:
            self.slide_combo.clear()
            for layer in slide_layers(self.viewer):
                self.slide_combo.addItem(layer.name, weakref.ref(layer))
            if current is not None:
                for i in range(self.slide_combo.count()):
                    if self.slide_combo.itemData(i)() is current:
                        self.slide_combo.setCurrentIndex(i)
            elif self.slide_combo.count():
                self.slide_combo.setCurrentIndex(self.slide_combo.count() - 1)
        finally:
            self.slide_combo.blockSignals(False)
        self._update_buttons()

    def _on_layer_inserted(self, event: Any) -> None:
        layer = event.value
        if is_slide_layer(layer):
            self._refresh_slides()
            self.set_slide(layer)
            # not from inside the insertion event: add layers once it has completed
            QTimer.singleShot(0, lambda ref=weakref.ref(layer): self._setup_slide_ref(ref))

    def _setup_slide_ref(self, ref: Any) -> None:
        layer = ref()
        if layer is not None and layer in self.viewer.layers:
            self._setup_slide(layer)

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        if is_slide_layer(layer):
            path = slide_path_of(layer)
            if self._run is not None and self._run.slide_layer is layer:
                self.cancel()
            saver = self.autosavers.get(path)
            if saver is not None and not any(
                    slide_path_of(s) == path for s in slide_layers(self.viewer)):
                saver.flush()
            self._refresh_slides()

    def _setup_slide(self, slide_layer: Any) -> Any:
        """Restore (or create) the slide's Annotations layer and start its autosave."""
        path = slide_path_of(slide_layer)
        try:
            layer = restore_annotations(self.viewer, slide_layer, data_dir=self.data_dir,
                                        classes=self._classes)
        except Exception as exc:  # noqa: BLE001 - the viewer must survive
            from napari.utils.notifications import show_error

            show_error(f"napari-magnet: cannot set up annotations for {slide_layer.name}: "
                       f"{exc}")
            return None
        self._apply_feature_defaults(layer)
        saver = self.autosavers.get(path)
        if saver is None:
            saver = AnnotationAutosaver(self.viewer, path, data_dir=self.data_dir,
                                        delay_ms=self.autosave_delay_ms, parent=self)
            self.autosavers[path] = saver
        watch_slide_layers(saver, self.viewer)
        for roi in layers_of(self.viewer, path, kinds=("rois",)):
            bind_review_keys(roi, self._classes)
        return layer

    def annotations_layer(self, slide_layer: Any = None) -> Any:
        """The Annotations layer of a slide (default: the current one), created if needed."""
        slide_layer = slide_layer or self.slide_layer
        if slide_layer is None:
            return None
        found = layers_of(self.viewer, slide_path_of(slide_layer), kinds=("annotations",))
        return found[0] if found else self._setup_slide(slide_layer)

    # -- classes and review ----------------------------------------------------------------
    def _classes(self) -> list[str]:
        return list(self.classes)

    def set_classes(self, names: list[str]) -> None:
        """Replace the class list (duplicates and blanks dropped)."""
        clean = list(dict.fromkeys(n.strip() for n in names if n and n.strip()))
        if not clean:
            clean = list(DEFAULT_CLASSES)
        self.classes = clean
        self.classes_edit.setText(", ".join(clean))
        current = self.class_combo.currentText()
        self.class_combo.blockSignals(True)
        self.class_combo.clear()
        self.class_combo.addItems(clean)
        if current in clean:
            self.class_combo.setCurrentText(current)
        self.class_combo.blockSignals(False)
        self._on_current_class(self.class_combo.currentText())

    def _on_classes_edited(self) -> None:
        self.set_classes(self.classes_edit.text().split(","))

    def _on_current_class(self, name: str) -> None:
        for layer in self.viewer.layers:
            if layer_kind(layer) in ("annotations", "imported"):
                self._apply_feature_defaults(layer)

    def _apply_feature_defaults(self, layer: Any) -> None:
        if layer is None:
            return
        defaults = {"class": self.class_combo.currentText(), "review": "unreviewed"}
        if "name" in layer.features:
            defaults["name"] = ""
        try:
            layer.feature_defaults = defaults
        except (ValueError, KeyError):  # pragma: no cover - columns differ
            pass

    def _review_target(self) -> Any:
        from napari.layers import Shapes

        layer = self.viewer.layers.selection.active
        if isinstance(layer, Shapes) and layer_kind(layer) in ("annotations", "rois",
                                                               "imported"):
            return layer
        return None

    def set_review(self, state: str, layer: Any = None) -> int:
        """Set the review state of the selected shapes of ``layer`` (default: the active
        layer, when it is one of ours)."""
        layer = layer or self._review_target()
        if layer is None:
            self.review_label.setText("Select shapes in an Annotations or ROI layer first")
            return 0
        n = set_review(layer, state)
        self.review_label.setText(f"{n} shape(s) {state}" if n else "No shapes selected")
        return n

    def set_class(self, name: str, layer: Any = None) -> int:
        """Give the selected shapes of ``layer`` (default: the active one) class ``name``."""
        layer = layer or self._review_target()
        if layer is None:
            self.review_label.setText("Select shapes in an Annotations or ROI layer first")
            return 0
        n = set_class(layer, name)
        self.review_label.setText(f"{n} shape(s) → {name}" if n else "No shapes selected")
        return n

    # -- magnify ---------------------------------------------------------------------------
    def selected_box(self, slide_layer: Any = None) -> tuple | None:
        """Level-0 box of the shapes selected in a Shapes layer that is not an ROI layer (the
        active layer first), or ``None``."""
        from napari.layers import Shapes

        from ..io.layerdata import shapes_box_level0

        slide_layer = slide_layer or self.slide_layer
        if slide_layer is None:
            return None
        active = self.viewer.layers.selection.active
        order = [active] + [lyr for lyr in reversed(self.viewer.layers) if lyr is not active]
        for layer in order:
            if not isinstance(layer, Shapes) or layer_kind(layer) == "rois":
                continue
            selected = sorted(i for i in (layer.selected_data or ()) if i < layer.nshapes)
            if not selected:
                continue
            verts = np.concatenate([np.asarray(layer.data[i])[:, -2:] for i in selected])
            return shapes_box_level0(verts, tuple(layer.scale)[-2:],
                                     tuple(layer.translate)[-2:],
                                     tuple(slide_layer.scale)[-2:],
                                     tuple(slide_layer.translate)[-2:])
        return None

    def run_magnify(self) -> Any:
        """Start a run on the current slide with the chosen model/device (the Magnify
        button); returns the worker, or ``None`` when nothing was started."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        if self._run_active:
            return None
        avoid_triton_llvm_clash()
        slide_layer = self.slide_layer
        if slide_layer is None:
            show_error("napari-magnet: open a slide first (File > Open, or drag a slide in)")
            return None
        spec = self.model_spec
        if spec == _CHECKPOINT_SENTINEL:
            return None
        device = str(self.device_combo.currentData())
        box = self.selected_box(slide_layer)
        n_patches = self.patches_spin.value() if self._patches_allowed else 0
        slide = slide_layer.metadata["slide"]
        if box is not None:
            x0, y0, x1, y1 = box
            self.region_label.setText(f"Region: selected box x {x0:.0f}–{x1:.0f}, "
                                      f"y {y0:.0f}–{y1:.0f} px")
        else:
            self.region_label.setText("Region: whole slide")
        run = MagnifyRun(id=next(_run_ids), slide_layer=slide_layer,
                         slide_path=slide_path_of(slide_layer), model=spec, device=device,
                         box=box)
        self._run = run
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.result_label.setText(f"Magnifying with {spec}…")
        mpp = slide_layer.metadata.get("mpp")
        worker = thread_worker(magnify_items, start_thread=False)(
            slide, spec, device, box, n_patches or None, run.cancel_event, mpp)
        worker.yielded.connect(lambda item, r=run: self._on_yielded(r, item))
        worker.finished.connect(lambda r=run: self._on_finished(r))
        self._worker = worker
        self._update_buttons()
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the run at the next step boundary and remove its layers now."""
        run = self._run
        if run is None or run.cancelled or run.failed:
            return
        run.cancelled = True
        run.cancel_event.set()
        self._remove_run_layers(run)
        self.result_label.setText("Cancelled: stopping at the next step…")
        self._update_buttons()

    def _on_yielded(self, run: MagnifyRun, item: tuple) -> None:
        if run is not self._run or run.cancelled or run.failed:
            return
        try:
            kind = item[0]
            if kind == "model":
                run.n_layers = int(item[1])
                self.progress.setRange(0, max(run.n_layers, 1))
                self.progress.setValue(0)
            elif kind == "tissue":
                run.tissue = item[1]
            elif kind == "step":
                self._add_step(run, item[1], item[2])
            elif kind == "result":
                run.result = item[1]
                self._show_result(run)
            elif kind == "error":
                self._fail(run, item[1])
        except Exception as exc:  # noqa: BLE001 - a broken step must not take napari down
            self._fail(run, exc)

    def _add_step(self, run: MagnifyRun, step: Any, data: Any) -> None:
        """Queue the step's layers: each is added in its own turn of the event loop, so the
        viewer keeps drawing and reacting between them (napari needs 0.1 s or more to add a
        layer)."""
        run.steps.append(step)
        run.coverage = data.coverage
        self._enqueue(run, lambda: add_attention_layer(
            self.viewer, run.slide_layer, data.attention, step.layer, run.tag, data.n_maps))
        self._enqueue(run, lambda: self._add_rois(run, step.layer, data.rois))
        self._enqueue(run, lambda: self._step_shown(run))

    def _enqueue(self, run: MagnifyRun, action: Any) -> None:
        self._pending.append((run, action))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            QTimer.singleShot(DRAIN_DELAY_MS, self._drain_one)

    def _drain_one(self) -> None:
        """Run one queued action (adding one layer), then yield to the event loop."""
        self._drain_scheduled = False
        while self._pending:
            run, action = self._pending.popleft()
            if run is None:  # housekeeping (removing layers): always done
                try:
                    action()
                except Exception:  # noqa: BLE001 - e.g. the layer is already gone
                    pass
                break
            if run.cancelled or run.failed:
                continue  # dropped: the run is gone
            try:
                if run.slide_layer not in self.viewer.layers:
                    raise RuntimeError(f"the slide layer {run.slide_layer.name!r} was removed")
                with self._no_activation():
                    added = action()
                if added is not None and added not in run.layers:
                    run.layers.append(added)
            except Exception as exc:  # noqa: BLE001 - a broken step must not take napari down
                self._fail(run, exc)
            break
        if self._pending:
            self._drain_scheduled = True
            QTimer.singleShot(DRAIN_DELAY_MS, self._drain_one)
        else:
            self._update_buttons()

    @contextlib.contextmanager
    def _no_activation(self):
        """Add layers without making each the active one (the user's selection stays)."""
        layers = self.viewer.layers
        flag = getattr(layers, "_activate_on_insert", None)
        active, selected = layers.selection.active, set(layers.selection)
        if flag is not None:
            layers._activate_on_insert = False
        try:
            yield
        finally:
            if flag is not None:
                layers._activate_on_insert = flag
            if set(layers.selection) != selected:  # older napari: restore by hand
                layers.selection.clear()
                layers.selection.update({x for x in selected if x in layers})
                if active is not None and active in layers:
                    layers.selection.active = active

    def _add_rois(self, run: MagnifyRun, layer_no: int, rois: Any) -> Any:
        layer = add_roi_layer(self.viewer, run.slide_layer, rois.rects, rois.features,
                              layer_no, run.tag)
        bind_review_keys(layer, self._classes)
        return layer

    def _step_shown(self, run: MagnifyRun) -> None:
        """After a step's layers: the user's drawing layers back on top, progress."""
        viewer = self.viewer
        for layer in layers_of(viewer, run.slide_path, kinds=("annotations",)):
            i = viewer.layers.index(layer)
            if i != len(viewer.layers) - 1:
                viewer.layers.move(i, len(viewer.layers))
        run.shown += 1
        self.progress.setValue(min(run.shown, self.progress.maximum()))
        self.step_shown.emit(run.shown)
        if run.finished and run.shown >= len(run.steps) and not run.cancelled:
            self._finish(run)

    def _show_result(self, run: MagnifyRun) -> None:
        r = run.result
        parts = [f"p = {r.probability:.3f} (label {r.label})",
                 f"{_fmt_count(r.pixels_processed)} px processed / "
                 f"{_fmt_count(r.pixels_read)} px read",
                 f"{r.seconds:.1f} s"]
        if run.coverage is not None:
            summary = coverage_summary(run.coverage)
            if summary.get("tissue_cells"):
                parts.append(f"tissue examined {100 * summary['examined']:.0f}%")
        self.result_label.setText(f"{r.model_name}: " + " · ".join(parts))

    def _fail(self, run: MagnifyRun, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        run.failed = True
        run.error = describe_error(exc)
        run.cancel_event.set()
        self._remove_run_layers(run)
        self.result_label.setText(f"Failed: {run.error}")
        show_error(f"napari-magnet: Magnify on {run.slide_layer.name} with {run.model} "
                   f"failed: {run.error}")
        self._update_buttons()

    def _remove_run_layers(self, run: MagnifyRun) -> None:
        self.remove_layers_later(run.layers)
        run.layers = []
        run.coverage_layer = None

    def remove_layers_later(self, layers: list) -> None:
        """Hide the layers now; remove them in the next turn of the event loop, all in one
        batch (napari runs a full garbage collection after removing layers — ~0.5 s with
        torch loaded — once per batch instead of once per layer)."""
        doomed = [layer for layer in layers if layer in self.viewer.layers]
        if not doomed:
            return
        for layer in doomed:
            layer.visible = False
        self._enqueue(None, lambda: self._remove_now(doomed))

    def _remove_now(self, layers: list) -> None:
        viewer_layers = self.viewer.layers
        batch = getattr(viewer_layers, "batched_update", None)
        with batch() if batch is not None else contextlib.nullcontext():
            for layer in layers:
                if layer in viewer_layers:
                    viewer_layers.remove(layer)

    def _on_finished(self, run: MagnifyRun) -> None:
        """The worker is done; commit once the queued layers of its last step are shown."""
        if run is self._run:
            self._worker = None
        run.finished = True
        if run.cancelled or run.failed or run.result is None or run.shown >= len(run.steps):
            self._finish(run)
        self._update_buttons()

    def _finish(self, run: MagnifyRun) -> None:
        if run.closed:
            return
        run.closed = True
        if run is self._run:
            self._run = None
        outcome = "failed"
        try:
            if run.failed:
                pass
            elif run.cancelled or run.result is None:
                outcome = "cancelled"
                self._remove_run_layers(run)
                self.result_label.setText("Cancelled: no layers kept")
                self.progress.setValue(0)
            else:
                self._commit(run)
                outcome = "committed"
        finally:
            self._update_buttons()
        self.run_finished.emit(outcome)

    def _commit(self, run: MagnifyRun) -> None:
        viewer = self.viewer
        old = [layer for layer in layers_of(viewer, run.slide_path, kinds=RUN_KINDS)
               if layer_info(layer).get("run") != run.tag]
        self.remove_layers_later(old)
        if run.coverage is not None:
            self._enqueue(None, lambda: self._add_coverage(run))
        for layer in run.layers:
            if layer_kind(layer) == "rois":
                layer.metadata[KEY]["committed"] = True
        # plain names once the previous run's layers are gone
        self._enqueue(None, lambda: self._rename(run))
        self.last_runs[run.slide_path] = run
        saver = self.autosavers.get(run.slide_path)
        if saver is not None:
            watch_slide_layers(saver, viewer)
            saver.schedule()

    def _add_coverage(self, run: MagnifyRun) -> None:
        if run.slide_layer not in self.viewer.layers or self.last_runs.get(
                run.slide_path) is not run:
            return  # the slide is gone, or a newer run replaced this one meanwhile
        with self._no_activation():
            run.coverage_layer = set_coverage_layer(
                self.viewer, run.slide_layer, run.coverage,
                max(run.n_layers, len(run.steps)), run.tag)
        run.layers.append(run.coverage_layer)

    def _rename(self, run: MagnifyRun) -> None:
        for layer in run.layers:
            if layer in self.viewer.layers:
                layer.name = base_name(layer.name)

    # -- export / import -----------------------------------------------------------------
    def export_all(self, path: Any = None) -> list[Path] | None:
        """Write the current slide's last run and annotations into the folder ``path`` (a
        dialog asks when ``None``): rois.geojson (with review states), annotations.geojson,
        attention_L*.ome.tif, result.json. Returns the files, or ``None`` on failure."""
        from napari.utils.notifications import show_error, show_info

        from ..io.geojson import PROPERTIES_KEY, steps_to_annotations, write_geojson
        from ..io.results import export_run

        slide_layer = self.slide_layer
        if slide_layer is None:
            show_error("napari-magnet: no slide to export")
            return None
        if path is None:
            path = QFileDialog.getExistingDirectory(self, "Export all into a folder")
            if not path:
                return None
        slide_path = slide_path_of(slide_layer)
        mpp = slide_layer.metadata.get("mpp")
        run = self.last_runs.get(slide_path)
        try:
            annotations = []
            for layer in layers_of(self.viewer, slide_path, kinds=("annotations", "imported")):
                annotations.extend(layer_annotations(layer))
            steps = run.steps if run is not None else []
            result = run.result if run is not None else None
            written = export_run(path, slide_path, tuple(mpp) if mpp else None, steps, result,
                                 annotations)
            # ROIs again, now with the reviewer's classes and states (same ids)
            roi_layers = layers_of(self.viewer, slide_path, kinds=("rois",))
            states = {}
            for layer in roi_layers:
                feats = layer.features
                for rid, klass, review in zip(feats["id"], feats["class"], feats["review"]):
                    states[str(rid)] = (str(klass or ""), str(review))
            if steps:
                rois = steps_to_annotations(steps, slide_name=Path(slide_path).name,
                                            probability=getattr(result, "probability", None))
                for a in rois:
                    klass, review = states.get(a.name, ("", "unreviewed"))
                    a.classification = klass or None
                    a.review = review
            else:
                rois = [a for layer in roi_layers for a in layer_annotations(layer)]
            for a in rois:
                ours = a.properties.setdefault(PROPERTIES_KEY, {})
                ours.setdefault("kind", "roi")
                if mpp:
                    ours["mpp"] = [float(mpp[0]), float(mpp[1])]
            write_geojson(Path(path) / "rois.geojson", rois)
        except Exception as exc:  # noqa: BLE001 - reported, the viewer survives
            show_error(f"napari-magnet: export failed: {type(exc).__name__}: {exc}")
            return None
        show_info(f"napari-magnet: exported {len(written)} files to {path}")
        return written

    def import_geojson(self, path: Any = None) -> Any:
        """Add a GeoJSON file (QuPath's or ours) onto the current slide as a Shapes layer.

        Coordinates are checked against the slide's size; any problem is reported with
        ``show_error`` and nothing is added. Returns the layer or ``None``."""
        from napari.utils.notifications import show_error

        from ..io.geojson import GeoJSONError, load_geojson

        slide_layer = self.slide_layer
        if slide_layer is None:
            show_error("napari-magnet: open the slide the annotations belong to first")
            return None
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Import GeoJSON", "",
                                                  "GeoJSON (*.geojson *.json)")
            if not path:
                return None
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = load_geojson(path, max_extent=slide_layer.metadata["slide"].dimensions)
            if not result.annotations:
                raise GeoJSONError(f"{path}: no area annotations in the file")
        except GeoJSONError as exc:
            show_error(f"napari-magnet: cannot import: {exc}")
            return None
        layer = add_annotations_layer(self.viewer, slide_layer, result.annotations,
                                      kind="imported", classes=self._classes,
                                      name=f"{slide_layer.name} · {Path(path).stem}")
        self._apply_feature_defaults(layer)
        saver = self.autosavers.get(slide_path_of(slide_layer))
        if saver is not None:
            saver.watch(layer)
            saver.schedule()
        return layer

    # -- shutdown --------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Cancel a running run and write pending autosaves (called when Qt quits)."""
        try:
            if self._run is not None:
                self._run.cancel_event.set()
            for saver in list(self.autosavers.values()):
                saver.flush()
        except RuntimeError:  # pragma: no cover - Qt objects already deleted
            pass


def add_magnify_widget(viewer: napari.Viewer, **kwargs: Any) -> MagnifyWidget:
    """Dock a :class:`MagnifyWidget` on the right of ``viewer`` and return it."""
    widget = MagnifyWidget(viewer, **kwargs)
    viewer.window.add_dock_widget(widget, name="Magnify", area="right")
    return widget
