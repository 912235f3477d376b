"""A vertical scroll area for the dock widget's panels: nothing is ever clipped.

In a short napari window the dock is shorter than the panels: a plain layout then squeezes
them, and the word-wrapped lines (the slide line, the result line) lose their last lines.
Inside :class:`VerticalScrollArea` the panels keep the height they need (their width is the
dock's, so lines wrap instead of widening it) and the dock scrolls; napari's own dock widgets
and most plugin widgets do the same.
"""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import QEvent, QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QWidget


class VerticalScrollArea(QScrollArea):
    """Scrolls ``content`` vertically; at least as wide as ``content`` needs.

    Parameters
    ----------
    content : QWidget
        The panels.
    parent : QWidget, optional
        Parent widget.
    """

    def __init__(self, content: QWidget, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setFrameShape(QFrame.NoFrame)
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.setWidget(content)

    def _extra_width(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def sizeHint(self) -> QSize:
        """The content's size hint, plus room for the scroll bar."""
        hint = self.widget().sizeHint()
        return QSize(hint.width() + self._extra_width(), hint.height())

    def minimumSizeHint(self) -> QSize:
        """As wide as the content's minimum (never cut on the right), a few lines high."""
        width = self.widget().minimumSizeHint().width() + self._extra_width()
        return QSize(width, 6 * self.fontMetrics().height())

    def eventFilter(self, obj: Any, event: Any) -> bool:
        """The content's size hints changed (a longer slide name): so did ours."""
        if obj is self.widget() and event.type() == QEvent.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(obj, event)
