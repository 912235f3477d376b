"""The Review panel: the class list, the class of new shapes, review states.

Classes and review states are set on the selected shapes of the active Annotations, ROI or
imported layer (the keys bound by :func:`~napari_magnet._napari.annotations.bind_review_keys`
do the same from the canvas).
"""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QWidget,
)

from ...io.geojson import DEFAULT_CLASSES
from ..annotations import set_class, set_review
from ..layers import layer_kind

#: Layer kinds whose shapes are reviewed.
REVIEWED_KINDS = ("annotations", "rois", "imported")
#: Kinds of the layers new shapes are drawn in (they take the current class).
DRAWN_KINDS = ("annotations", "imported")
REVIEW_BUTTONS = (
    ("Accept", "accepted", "Shift-A"),
    ("Reject", "rejected", "Shift-R"),
    ("Unreviewed", "unreviewed", "Shift-U"),
)


class ReviewPanel(QGroupBox):
    """The "Review" group of the dock widget.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer whose layers are reviewed.
    parent : QWidget, optional
        Parent widget.
    """

    def __init__(self, viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__("Review", parent)
        self.viewer = viewer
        self.classes: list[str] = list(DEFAULT_CLASSES)
        form = QFormLayout(self)
        self.classes_edit = QLineEdit(", ".join(self.classes))
        self.classes_edit.setToolTip(
            "Annotation classes, comma-separated (Alt-1 … Alt-9 "
            "give the selected shapes class 1 … 9)"
        )
        self.classes_edit.editingFinished.connect(
            lambda: self.set_classes(self.classes_edit.text().split(","))
        )
        form.addRow("Classes", self.classes_edit)

        row = QHBoxLayout()
        self.class_combo = QComboBox()
        self.class_combo.addItems(self.classes)
        self.class_combo.setToolTip(
            "Class of new shapes, and of the selected ones with 'Set class'"
        )
        self.class_combo.currentTextChanged.connect(self._on_current_class)
        self.set_class_button = QPushButton("Set class")
        self.set_class_button.clicked.connect(
            lambda: self.set_class(self.class_combo.currentText())
        )
        row.addWidget(self.class_combo, 1)
        row.addWidget(self.set_class_button)
        form.addRow("Class", row)

        states = QHBoxLayout()
        self.review_buttons: dict[str, QPushButton] = {}
        for label, state, key in REVIEW_BUTTONS:
            button = QPushButton(label)
            button.setToolTip(f"Mark the selected shapes {state} ({key})")
            button.clicked.connect(lambda _=False, s=state: self.set_review(s))
            states.addWidget(button)
            self.review_buttons[state] = button
        form.addRow(states)
        self.review_label = QLabel("")
        self.review_label.setWordWrap(True)
        self.review_label.setSizePolicy(QSizePolicy.Ignored, QSizePolicy.Preferred)
        form.addRow(self.review_label)

    # -- classes ---------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        """A copy of the class list (the provider the key bindings call)."""
        return list(self.classes)

    def set_classes(self, names: list[str]) -> None:
        """Replace the class list (duplicates and blanks dropped; empty → the defaults)."""
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

    def _on_current_class(self, _name: str) -> None:
        for layer in self.viewer.layers:
            if layer_kind(layer) in DRAWN_KINDS:
                self.apply_feature_defaults(layer)

    def apply_feature_defaults(self, layer: Any) -> None:
        """New shapes of ``layer`` get the current class and ``unreviewed``."""
        if layer is None:
            return
        defaults = {"class": self.class_combo.currentText(), "review": "unreviewed"}
        if "name" in layer.features:
            defaults["name"] = ""
        try:
            layer.feature_defaults = defaults
        except (ValueError, KeyError):  # pragma: no cover - columns differ
            pass

    # -- review ----------------------------------------------------------------------------
    def review_target(self) -> Any:
        """The active layer when it is a Shapes layer of ours that is reviewed, else None."""
        from napari.layers import Shapes

        layer = self.viewer.layers.selection.active
        if isinstance(layer, Shapes) and layer_kind(layer) in REVIEWED_KINDS:
            return layer
        return None

    def set_review(self, state: str, layer: Any = None) -> int:
        """Set the review state of the selected shapes of ``layer`` (default: the active
        layer, when it is one of ours); returns how many shapes changed."""
        layer = layer or self.review_target()
        if layer is None:
            self.review_label.setText("Select shapes in an Annotations or ROI layer first")
            return 0
        n = set_review(layer, state)
        self.review_label.setText(f"{n} shape(s) {state}" if n else "No shapes selected")
        return n

    def set_class(self, name: str, layer: Any = None) -> int:
        """Give the selected shapes of ``layer`` (default: the active one) class ``name``;
        returns how many shapes changed."""
        layer = layer or self.review_target()
        if layer is None:
            self.review_label.setText("Select shapes in an Annotations or ROI layer first")
            return 0
        n = set_class(layer, name)
        self.review_label.setText(f"{n} shape(s) → {name}" if n else "No shapes selected")
        return n
