"""The Qt panels of the Magnify dock widget (:class:`~napari_magnet._napari.widget.MagnifyWidget`
composes them): :class:`.MagnifyPanel`, :class:`.ReviewPanel`, :class:`.ExportPanel`."""

from .export_panel import ExportPanel
from .magnify_panel import MagnifyPanel, RunSettings
from .review_panel import ReviewPanel

__all__ = ["ExportPanel", "MagnifyPanel", "ReviewPanel", "RunSettings"]
