"""The Export panel: *Export all…* into a folder, *Import GeoJSON…* onto the current slide."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import QFileDialog, QGroupBox, QHBoxLayout, QPushButton, QWidget

from ..annotations import add_annotations_layer
from ..exporting import collect_export, write_export
from ..layers import slide_path_of


class ExportPanel(QGroupBox):
    """The "Export and import" group of the dock widget.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_layer : callable
        ``slide_layer() -> layer or None``: the current slide.
    last_run : callable
        ``last_run(slide_path) -> MagnifyRun or None``: the slide's last committed run.
    classes : callable
        ``classes() -> list of str``: the class list (for the imported layer's keys).
    on_imported : callable, optional
        Called with each imported layer (feature defaults, autosave).
    parent : QWidget, optional
        Parent widget.
    """

    def __init__(
        self,
        viewer: Any,
        *,
        slide_layer: Callable[[], Any],
        last_run: Callable[[str], Any],
        classes: Callable[[], list[str]],
        on_imported: Callable[[Any], None] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__("Export and import", parent)
        self.viewer = viewer
        self._slide_layer = slide_layer
        self._last_run = last_run
        self._classes = classes
        self._on_imported = on_imported
        row = QHBoxLayout(self)
        self.export_button = QPushButton("Export all…")
        self.export_button.setToolTip(
            "rois.geojson, annotations.geojson, attention_L*.ome.tif and result.json into a folder"
        )
        self.export_button.clicked.connect(lambda: self.export_all())
        self.import_button = QPushButton("Import GeoJSON…")
        self.import_button.setToolTip("QuPath or napari-magnet GeoJSON onto the slide")
        self.import_button.clicked.connect(lambda: self.import_geojson())
        row.addWidget(self.export_button)
        row.addWidget(self.import_button)

    def export_all(self, path: Any = None) -> list[Path] | None:
        """Write the current slide's last run and annotations into the folder ``path`` (a
        dialog asks when ``None``): rois.geojson (with review states), annotations.geojson,
        attention_L*.ome.tif, result.json.

        Returns
        -------
        list of Path or None
            The files, or ``None`` on failure or when the dialog was cancelled.
        """
        from napari.utils.notifications import show_error, show_info

        slide_layer = self._slide_layer()
        if slide_layer is None:
            show_error("napari-magnet: no slide to export")
            return None
        if path is None:
            path = QFileDialog.getExistingDirectory(self, "Export all into a folder")
            if not path:
                return None
        try:
            record = collect_export(
                self.viewer, slide_layer, self._last_run(slide_path_of(slide_layer))
            )
            written = write_export(record, path)
        except Exception as exc:  # noqa: BLE001 - reported, the viewer survives
            show_error(f"napari-magnet: export failed: {type(exc).__name__}: {exc}")
            return None
        show_info(f"napari-magnet: exported {len(written)} files to {path}")
        return written

    def import_geojson(self, path: Any = None) -> Any:
        """Add a GeoJSON file (QuPath's or ours) onto the current slide as a Shapes layer.

        Coordinates are checked against the slide's size; any problem is reported with
        ``show_error`` and nothing is added. A file with no features (an exported empty
        collection) adds an empty layer to draw in.

        Returns
        -------
        napari.layers.Shapes or None
            The new layer.
        """
        from napari.utils.notifications import show_error

        from ...io.geojson import GeoJSONError, load_geojson

        slide_layer = self._slide_layer()
        if slide_layer is None:
            show_error("napari-magnet: open the slide the annotations belong to first")
            return None
        if path is None:
            path, _ = QFileDialog.getOpenFileName(
                self, "Import GeoJSON", "", "GeoJSON (*.geojson *.json)"
            )
            if not path:
                return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = load_geojson(path, max_extent=slide_layer.metadata["slide"].dimensions)
        except GeoJSONError as exc:
            show_error(f"napari-magnet: cannot import: {exc}")
            return None
        layer = add_annotations_layer(
            self.viewer,
            slide_layer,
            result.annotations,
            kind="imported",
            classes=self._classes,
            name=f"{slide_layer.name} · {Path(path).stem}",
        )
        if self._on_imported is not None:
            self._on_imported(layer)
        return layer
