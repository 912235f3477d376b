"""Fixtures shared by the viewer tests: a writable slide copy and a viewer with the widget."""

from __future__ import annotations

import shutil

import pytest

from napari_magnet._napari.layers import layer_kind
from napari_magnet._napari.widget import add_magnify_widget


@pytest.fixture
def slide_copy(tmp_path, cmu_path):
    """A writable copy of the CMU slide (autosaves must never land in the shared data)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    target = folder / cmu_path.name
    shutil.copyfile(cmu_path, target)
    yield target
    folder.chmod(0o755)  # a test may have made it read-only


@pytest.fixture
def setup(make_napari_viewer, qtbot, slide_copy, tmp_path, monkeypatch):
    """A shown viewer with the Magnify widget docked and the slide copy open."""
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    viewer = make_napari_viewer(show=True)
    widget = add_magnify_widget(viewer, autosave_delay_ms=200)
    (slide,) = viewer.open(str(slide_copy), plugin="napari-magnet")
    qtbot.waitUntil(
        lambda: any(layer_kind(lyr) == "annotations" for lyr in viewer.layers), timeout=10_000
    )
    return viewer, widget, slide
