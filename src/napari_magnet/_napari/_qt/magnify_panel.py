"""The Magnify panel: slide, model, device, patches, Magnify/Cancel, progress, result line.

The panel holds no run logic: it hands out :class:`RunSettings`, emits ``magnify_clicked`` /
``cancel_clicked`` and displays the controller's
:class:`~napari_magnet._napari.run_controller.RunStatus`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QWidget,
)

from ..run_controller import RunStatus
from ..run_worker import cuda_status, model_choices, patches_adjustable

CHECKPOINT_ITEM = "Checkpoint file…"
CHECKPOINT_SENTINEL = "__checkpoint__"
DEVICES = (("auto", "auto"), ("CPU", "cpu"), ("CUDA", "cuda"))


@dataclass(frozen=True)
class RunSettings:
    """The run settings chosen in the panel.

    Attributes
    ----------
    model : str
        Model name or checkpoint path.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    n_patches : int or None
        Patches override; ``None`` for the model's default (or when it does not apply).
    """

    model: str
    device: str
    n_patches: int | None = None


def _wrapping_label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    # long texts wrap instead of widening the dock (and shrinking the canvas)
    label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
    return label


class MagnifyPanel(QGroupBox):
    """The "Magnify" group of the dock widget.

    Signals
    -------
    magnify_clicked()
        The Magnify button was pressed.
    cancel_clicked()
        The Cancel button was pressed.
    slide_changed()
        Another slide was chosen.
    """

    magnify_clicked = Signal()
    cancel_clicked = Signal()
    slide_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Magnify", parent)
        self._busy = False
        self._can_cancel = False
        self._patches_allowed = False
        form = QFormLayout(self)

        self.slide_combo = QComboBox()
        self.slide_combo.setToolTip("Slide layers opened with napari-magnet")
        self.slide_combo.currentIndexChanged.connect(self._on_slide_changed)
        form.addRow("Slide", self.slide_combo)
        # the slide line: size, pixel size, levels — or why there is no slide to magnify
        self.slide_info_label = _wrapping_label()
        form.addRow(self.slide_info_label)

        self.model_combo = QComboBox()
        for name in model_choices():
            self.model_combo.addItem(name, name)
        self.model_combo.addItem(CHECKPOINT_ITEM, CHECKPOINT_SENTINEL)
        self._last_model_index = 0
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        form.addRow("Model", self.model_combo)

        self.device_combo = QComboBox()
        for label, value in DEVICES:
            self.device_combo.addItem(label, value)
        ok, reason = cuda_status()
        if not ok:
            item = self.device_combo.model().item(2)
            item.setEnabled(False)
            item.setToolTip(reason)
            self.device_combo.setItemData(2, reason, Qt.ToolTipRole)
        self.device_combo.setToolTip(
            "auto = CUDA when available, else CPU" + ("" if ok else f"\nCUDA: {reason}")
        )
        form.addRow("Device", self.device_combo)

        self.patches_spin = QSpinBox()
        self.patches_spin.setRange(0, 100_000)
        self.patches_spin.setSpecialValueText("model default")
        self.patches_spin.setToolTip(
            "Number of patches the model draws (per region for "
            "multi-level sampling); only for models whose patches "
            "are adjustable — for the others the architecture fixes "
            "them"
        )
        form.addRow("Patches", self.patches_spin)

        self.region_label = _wrapping_label("Region: whole slide")
        self.region_label.setToolTip(
            "Select a rectangle in a Shapes layer (not an ROI layer) to magnify inside it"
        )
        form.addRow(self.region_label)

        buttons = QHBoxLayout()
        self.magnify_button = QPushButton("Magnify")
        self.magnify_button.clicked.connect(lambda: self.magnify_clicked.emit())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(lambda: self.cancel_clicked.emit())
        buttons.addWidget(self.magnify_button)
        buttons.addWidget(self.cancel_button)
        form.addRow(buttons)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m layers")
        form.addRow(self.progress)
        self.result_label = _wrapping_label()
        self.result_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow(self.result_label)
        self._on_model_changed(self.model_combo.currentIndex())

    # -- slides ----------------------------------------------------------------------------
    def current_slide(self) -> Any:
        """The chosen slide layer (``None`` without slides)."""
        ref = self.slide_combo.currentData()
        return ref() if callable(ref) else None

    def set_slides(self, layers: list) -> None:
        """List ``layers``; the chosen slide stays chosen, else the last one is."""
        current = self.current_slide()
        self.slide_combo.blockSignals(True)
        try:
            self.slide_combo.clear()
            for layer in layers:
                self.slide_combo.addItem(layer.name, weakref.ref(layer))
            index = next((i for i, layer in enumerate(layers) if layer is current), None)
            if index is None and layers:
                index = len(layers) - 1
            if index is not None:
                self.slide_combo.setCurrentIndex(index)
        finally:
            self.slide_combo.blockSignals(False)
        self._update_controls()

    def select_slide(self, layer: Any) -> None:
        """Choose ``layer``.

        Raises
        ------
        ValueError
            It is not listed.
        """
        for i in range(self.slide_combo.count()):
            ref = self.slide_combo.itemData(i)
            if callable(ref) and ref() is layer:
                self.slide_combo.setCurrentIndex(i)
                return
        raise ValueError(f"{getattr(layer, 'name', layer)!r} is not a slide layer here")

    def show_slide_info(self, text: str) -> None:
        """Set the slide line (under the slide list)."""
        self.slide_info_label.setText(text)

    def _on_slide_changed(self, _index: int) -> None:
        self._update_controls()
        self.slide_changed.emit()

    # -- model, device, patches ------------------------------------------------------------
    @property
    def model_spec(self) -> str:
        """The chosen model name or checkpoint path."""
        return str(self.model_combo.currentData())

    def set_model(self, spec: str) -> None:
        """Choose a model by name or checkpoint path (a path is added to the list if new).

        Raises
        ------
        ValueError
            Neither a listed name nor an existing file.
        """
        i = self.model_combo.findData(spec)
        if i < 0:
            if not Path(spec).exists():
                raise ValueError(f"unknown model {spec!r}")
            i = self.model_combo.count() - 1
            self.model_combo.insertItem(i, Path(spec).name, spec)
            self.model_combo.setItemData(i, spec, Qt.ToolTipRole)
        self.model_combo.setCurrentIndex(i)

    @property
    def device(self) -> str:
        """The chosen device."""
        return str(self.device_combo.currentData())

    def set_device(self, device: str) -> None:
        """Choose ``"auto"``, ``"cpu"`` or ``"cuda"``.

        Raises
        ------
        ValueError
            Unknown device.
        """
        i = self.device_combo.findData(device)
        if i < 0:
            raise ValueError(f"unknown device {device!r}")
        self.device_combo.setCurrentIndex(i)

    @property
    def patches_allowed(self) -> bool:
        """Whether the chosen model's patches are adjustable."""
        return self._patches_allowed

    def settings(self) -> RunSettings | None:
        """The chosen settings; ``None`` while no model is chosen."""
        spec = self.model_spec
        if spec == CHECKPOINT_SENTINEL:
            return None
        n_patches = self.patches_spin.value() if self._patches_allowed else 0
        return RunSettings(spec, self.device, n_patches or None)

    def _on_model_changed(self, index: int) -> None:
        if self.model_combo.itemData(index) == CHECKPOINT_SENTINEL:
            path, _ = QFileDialog.getOpenFileName(
                self, "Choose a checkpoint", "", "Checkpoints (*.safetensors *.json)"
            )
            self.model_combo.blockSignals(True)
            try:
                if path:
                    self.set_model(path)
                else:
                    self.model_combo.setCurrentIndex(self._last_model_index)
            finally:
                self.model_combo.blockSignals(False)
        self._last_model_index = self.model_combo.currentIndex()
        self._patches_allowed = patches_adjustable(self.model_spec)
        if not self._patches_allowed:
            self.patches_spin.setValue(0)
        self._update_controls()

    # -- status ----------------------------------------------------------------------------
    def show_region(self, box: tuple | None) -> None:
        """Show the region a run looks at (a level-0 box, or the whole slide)."""
        if box is None:
            self.region_label.setText("Region: whole slide")
            return
        x0, y0, x1, y1 = box
        self.region_label.setText(
            f"Region: selected box x {x0:.0f}–{x1:.0f}, y {y0:.0f}–{y1:.0f} px"
        )

    def show_status(self, status: RunStatus) -> None:
        """Display a run's status: buttons, progress and the result line."""
        self._busy, self._can_cancel = status.busy, status.can_cancel
        maximum = max(status.expected, 1)
        if self.progress.maximum() != maximum:
            self.progress.setRange(0, maximum)
        self.progress.setValue(min(status.shown, maximum))
        self.result_label.setText(status.message)
        self._update_controls()

    def _update_controls(self) -> None:
        busy = self._busy
        self.magnify_button.setEnabled(not busy and self.current_slide() is not None)
        self.cancel_button.setEnabled(self._can_cancel)
        self.model_combo.setEnabled(not busy)
        self.device_combo.setEnabled(not busy)
        self.slide_combo.setEnabled(not busy)
        self.patches_spin.setEnabled(not busy and self._patches_allowed)
