"""The "Opening slides" group of the dock widget: reopen a slide another reader opened, and
make napari-magnet napari's reader for slides — each only when the user clicks.

The logic lives in :mod:`..open_routes`; this group shows what applies and asks before it
touches napari's settings. It is hidden when there is nothing to offer.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import QGroupBox, QLabel, QMessageBox, QPushButton, QVBoxLayout, QWidget

from ..open_routes import (
    describe_preference_change,
    foreign_reader,
    foreign_slide_layers,
    foreign_slide_path,
    reader_preference,
    reopen_as_slide,
    set_reader_preference,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

REOPEN_TEXT = "Reopen with napari-magnet"
PREFER_TEXT = "Open slides with napari-magnet"


def _label(text: str = "") -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    return label


class OpenSlidesPanel(QGroupBox):
    """Offers to reopen foreign slide layers and to set the reader preference.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    parent : QWidget, optional
        Parent widget.

    Signals
    -------
    reopened(object)
        A foreign layer was replaced by this slide layer.
    """

    reopened = Signal(object)

    def __init__(self, viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__("Opening slides", parent)
        self.viewer = viewer
        self._notified: set[str] = set()
        layout = QVBoxLayout(self)
        self.reopen_label = _label()
        self.reopen_button = QPushButton(REOPEN_TEXT)
        self.reopen_button.setToolTip(
            "Replace the plain image layer by napari-magnet's lazy slide layer "
            "(µm scale, every pyramid level, tiles read on demand)"
        )
        self.reopen_button.clicked.connect(lambda: self.reopen())
        self.prefer_label = _label()
        self.prefer_button = QPushButton(PREFER_TEXT)
        self.prefer_button.setToolTip(
            "Make napari-magnet napari's preferred reader for slide files "
            "(asks first; napari's Preferences ▸ Plugins changes it back)"
        )
        self.prefer_button.clicked.connect(lambda: self.prefer())
        for widget in (self.reopen_label, self.reopen_button, self.prefer_label):
            layout.addWidget(widget)
        layout.addWidget(self.prefer_button)

        layers = viewer.layers
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self._on_removed)
        from napari.settings import get_settings

        # (napari disconnects callbacks of deleted Qt objects when they raise RuntimeError)
        get_settings().plugins.events.extension2reader.connect(self._schedule_refresh)
        self.refresh()

    # -- state -----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Show what applies now (hidden when nothing does)."""
        foreign = foreign_slide_layers(self.viewer)
        if foreign:
            names = ", ".join(f"‘{layer.name}’" for layer in foreign)
            self.reopen_label.setText(
                f"{names} opened with {foreign_reader(foreign[0])}: a plain image in pixels "
                "(one level, read whole), which Magnify cannot use."
            )
        self.reopen_label.setVisible(bool(foreign))
        self.reopen_button.setVisible(bool(foreign))
        pref = reader_preference()
        if not pref.complete:
            self.prefer_label.setText(
                "napari opens slide files with its builtin reader unless told otherwise "
                f"({', '.join(pref.to_set)})."
            )
        self.prefer_label.setVisible(not pref.complete)
        self.prefer_button.setVisible(not pref.complete)
        self.setVisible(bool(foreign) or not pref.complete)

    def _schedule_refresh(self, *_: Any) -> None:
        self.objectName()  # raises RuntimeError once Qt deleted the panel: napari disconnects
        # refresh outside the layer-list / settings event being emitted
        QTimer.singleShot(0, self._refresh_if_alive)

    def _refresh_if_alive(self) -> None:
        try:
            self.refresh()
        except RuntimeError:  # pragma: no cover - the widget was deleted meanwhile
            pass

    def _on_removed(self, event: Any) -> None:
        if foreign_slide_path(event.value):
            self._schedule_refresh()

    def _on_inserted(self, event: Any) -> None:
        layer = event.value
        path = foreign_slide_path(layer)  # cheap for the layers a run adds: no source path
        if path is None:
            return
        self._schedule_refresh()
        if path in self._notified:
            return
        self._notified.add(path)
        from napari.utils.notifications import (
            Notification,
            NotificationSeverity,
            notification_manager,
        )

        ref = weakref.ref(layer)
        notification_manager.dispatch(
            Notification(
                f"napari-magnet: ‘{layer.name}’ was opened with {foreign_reader(layer)} as a plain "
                "image in pixels. Reopen it as napari-magnet's slide layer to magnify it.",
                severity=NotificationSeverity.INFO,
                actions=[(REOPEN_TEXT, lambda *_: self._reopen_ref(ref))],
            )
        )

    def _reopen_ref(self, ref: Any) -> None:
        layer = ref()
        if layer is not None and layer in self.viewer.layers:
            self.reopen(layer)

    # -- actions ---------------------------------------------------------------------------
    def reopen(self, layer: Any = None) -> list:
        """Reopen ``layer`` (default: every foreign slide layer) with our reader.

        Returns
        -------
        list
            The new slide layers (a slide that fails to open is reported and skipped).
        """
        from napari.utils.notifications import show_error

        targets = [layer] if layer is not None else foreign_slide_layers(self.viewer)
        opened = []
        for target in targets:
            try:
                new = reopen_as_slide(self.viewer, target, fit=target is targets[-1])
            except Exception as exc:  # noqa: BLE001 - the viewer must survive
                show_error(f"napari-magnet: cannot reopen {getattr(target, 'name', target)}: {exc}")
                continue
            opened.append(new)
            self.reopened.emit(new)
        self.refresh()
        return opened

    def confirm(self, text: str) -> bool:
        """Ask the user (a Yes/No box); tests replace it."""
        answer = QMessageBox.question(
            self,
            PREFER_TEXT,
            text + "\n\nSet it now?",
            QMessageBox.Yes | QMessageBox.No,
            QMessageBox.No,
        )
        return answer == QMessageBox.Yes

    def prefer(self) -> dict:
        """Set napari-magnet as the preferred slide reader, after the user confirms.

        Returns
        -------
        dict
            ``pattern -> previous reader`` of the patterns set (empty when declined).
        """
        pref = reader_preference()
        if pref.complete or not self.confirm(describe_preference_change(pref)):
            return {}
        changed = set_reader_preference(pref.to_set)
        from napari.utils.notifications import show_info

        show_info(
            "napari-magnet is now napari's reader for "
            + ", ".join(changed)
            + " (napari settings ▸ Plugins ▸ File extension readers)."
        )
        self.refresh()
        return changed
