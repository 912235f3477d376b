"""Every route that opens a slide ends in our lazy slide layer, or one click from it.

Real viewers under Xvfb. napari's settings are the user's (they persist to disk): the
``settings`` fixture stops them being written and puts the reader preference back.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from npe2 import PluginManifest
from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
from qtpy.QtGui import QDropEvent
from qtpy.QtWidgets import QApplication, QWidget

from napari_magnet._napari import reader as reader_module
from napari_magnet._napari.layers import is_slide_layer, layer_kind
from napari_magnet._napari.open_routes import (
    PLUGIN,
    SLIDE_PATTERNS,
    describe_preference_change,
    foreign_slide_layers,
    reader_preference,
    reopen_as_slide,
    restore_reader_preference,
    set_reader_preference,
    slide_line,
    viewer_camera,
)
from napari_magnet._napari.view import open_slides_in
from napari_magnet._napari.widget import add_magnify_widget
from napari_magnet.cli import build_parser, cmd_view, main

NO_MPP_NOTE = "no pixel size recorded: coordinates in pixels"


@pytest.fixture
def settings(make_napari_viewer, monkeypatch):
    """napari's settings, not saved to the user's file, without reader preferences."""
    from napari.settings import get_settings

    current = get_settings()
    monkeypatch.setattr(current, "config_path", None)  # napari saves only with a path
    saved = dict(current.plugins.extension2reader)
    current.plugins.extension2reader = {}
    yield current
    current.plugins.extension2reader = saved


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def tiff_without_mpp(path, width=1800, height=600):
    """A tiled JPEG TIFF without resolution tags: OpenSlide's generic TIFF, no mpp."""
    image = np.full((height, width, 3), 235, np.uint8)
    image[height // 6 : -height // 6, width // 18 : -width // 18] = (190, 90, 160)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="jpeg")
    return path


def notes_since(start: int) -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(n.message) for n in notification_manager.records[start:]]


def note_count() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def plain_image_notes(start: int) -> list:
    """The "opened as a plain image" notifications since ``start``."""
    from napari.utils.notifications import notification_manager

    return [n for n in notification_manager.records[start:] if "plain image" in str(n.message)]


def camera_state(viewer) -> tuple:
    """``(*center, zoom)`` of the camera."""
    camera = viewer_camera(viewer)
    return (*(float(c) for c in camera.center), float(camera.zoom))


def fitted_state(viewer):
    """The camera Home gives now (applied: call it last)."""
    viewer.reset_view()
    return camera_state(viewer)


def qt_viewer_widget() -> QWidget:
    """napari's canvas widget (the drop target), found through Qt, not napari's internals."""
    for top in QApplication.topLevelWidgets():
        for child in top.findChildren(QWidget):
            if child.metaObject().className() == "QtViewer" and child.isVisible():
                return child
    raise AssertionError("no QtViewer widget")


def drop_files(paths) -> None:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    event = QDropEvent(
        QPointF(20, 20),
        Qt.DropAction.CopyAction,
        mime,
        Qt.MouseButton.LeftButton,
        Qt.KeyboardModifier.NoModifier,
    )
    # the drop handler itself (a synthetic event sent through QApplication is filtered out)
    qt_viewer_widget().dropEvent(event)


# --------------------------------------------------------------------------------------------
# the manifest and the preference
# --------------------------------------------------------------------------------------------


def test_slide_patterns_are_the_manifests():
    manifest = PluginManifest.from_distribution("napari-magnet")
    readers = {r.command: r for r in manifest.contributions.readers}
    assert tuple(readers["napari-magnet.get_reader"].filename_patterns) == SLIDE_PATTERNS
    other = readers["napari-magnet.get_other_image_reader"]
    assert set(other.filename_patterns) <= set(SLIDE_PATTERNS)
    assert {"*.tif", "*.tiff", "*.svs", "*.dcm"} <= set(other.filename_patterns)


def test_preference_is_set_only_when_asked_and_can_be_undone(settings):
    pref = reader_preference()
    assert pref.unset == SLIDE_PATTERNS and not pref.complete
    settings.plugins.extension2reader = {"*.svs": "napari-wsi", "*.png": "napari"}
    text = describe_preference_change()
    assert "*.ndpi" in text and "*.svs (now napari-wsi)" in text
    changed = set_reader_preference()
    assert changed["*.svs"] == "napari-wsi" and changed["*.ndpi"] is None
    assert set(changed) == set(SLIDE_PATTERNS)
    prefs = settings.plugins.extension2reader
    assert all(prefs[p] == PLUGIN for p in SLIDE_PATTERNS) and prefs["*.png"] == "napari"
    assert reader_preference().complete and set_reader_preference() == {}
    restore_reader_preference(changed)
    assert settings.plugins.extension2reader == {"*.svs": "napari-wsi", "*.png": "napari"}


def test_open_without_plugin_follows_the_preference(make_napari_viewer, settings, cmu_path):
    from napari.errors import MultipleReaderError

    viewer = make_napari_viewer()
    # napari's own behaviour: no preference → it refuses to guess; viewer.open(path) → builtins
    with pytest.raises(MultipleReaderError):
        viewer.open(str(cmu_path), plugin=None)
    (plain,) = viewer.open(str(cmu_path))
    assert not is_slide_layer(plain) and plain.source.reader_plugin == "napari"
    assert foreign_slide_layers(viewer) == [plain]
    set_reader_preference()
    (layer,) = viewer.open(str(cmu_path), plugin=None)
    assert is_slide_layer(layer) and layer.source.reader_plugin == PLUGIN
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert layer.multiscale is False and layer.metadata["slide"].dimensions == (2220, 2967)


def test_preference_keeps_ordinary_tiffs_opening(make_napari_viewer, settings, tmp_path):
    plain = tmp_path / "photo.tif"
    image = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    tifffile.imwrite(plain, image, photometric="rgb")  # striped: not a slide
    assert reader_module.get_reader(str(plain)) is None
    set_reader_preference()
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(plain), plugin=None)
    assert not is_slide_layer(layer)
    np.testing.assert_array_equal(np.asarray(layer.data), image)
    assert reader_module.get_other_image_reader(str(tiff_without_mpp(tmp_path / "s.tif"))) is None


def test_drag_and_drop_ends_in_our_layer_once_preferred(
    make_napari_viewer, settings, slide_copy, data_dir, qtbot
):
    viewer = make_napari_viewer(show=True)
    widget = add_magnify_widget(viewer, autosave_delay_ms=200)
    qtbot.waitUntil(widget.open_panel.prefer_button.isVisible, timeout=5000)
    asked = []
    widget.open_panel.confirm = lambda text: asked.append(text) or True
    start = note_count()
    qtbot.mouseClick(widget.open_panel.prefer_button, Qt.MouseButton.LeftButton)
    assert asked and "*.svs" in asked[0] and "Preferences ▸ Plugins" in asked[0]
    assert any("napari-magnet is now napari's reader" in m for m in notes_since(start))
    assert reader_preference().complete
    qtbot.waitUntil(widget.open_panel.isHidden, timeout=5000)
    drop_files([slide_copy])
    qtbot.waitUntil(lambda: widget.slide_layer is not None, timeout=10_000)
    (layer,) = [lyr for lyr in viewer.layers if is_slide_layer(lyr)]
    assert layer.source.reader_plugin == PLUGIN and widget.magnify_button.isEnabled()
    assert widget.slide_info_label.text().startswith("2,220 × 2,967 px · 0.499 µm/px")


def test_declining_the_confirmation_changes_nothing(make_napari_viewer, settings, data_dir):
    viewer = make_napari_viewer(show=True)
    widget = add_magnify_widget(viewer)
    widget.open_panel.confirm = lambda text: False
    assert widget.open_panel.prefer() == {}
    assert settings.plugins.extension2reader == {}
    assert not widget.open_panel.prefer_button.isHidden()


# --------------------------------------------------------------------------------------------
# a slide another reader opened
# --------------------------------------------------------------------------------------------


def test_reopen_offer_turns_a_builtin_layer_into_ours(
    make_napari_viewer, settings, slide_copy, data_dir, qtbot
):
    viewer = make_napari_viewer(show=True)
    points = viewer.add_points([[0, 0]], name="marks")
    widget = add_magnify_widget(viewer, autosave_delay_ms=200)
    start = note_count()
    (plain,) = viewer.open(str(slide_copy))  # napari's builtin reader: pixels, one array
    viewer.add_shapes(name="sketch")
    plain.name = "my slide"
    assert plain.source.reader_plugin == "napari" and not is_slide_layer(plain)
    qtbot.waitUntil(lambda: not widget.open_panel.reopen_button.isHidden(), timeout=5000)
    assert "opened with napari builtins" in widget.open_panel.reopen_label.text()
    assert widget.slide_layer is None and not widget.magnify_button.isEnabled()
    assert "reopen it with napari-magnet" in widget.slide_info_label.text()
    (note,) = plain_image_notes(start)
    assert [name for name, _ in note.actions] == ["Reopen with napari-magnet"]

    qtbot.mouseClick(widget.open_panel.reopen_button, Qt.MouseButton.LeftButton)
    assert plain not in viewer.layers
    layer = viewer.layers[1]
    assert is_slide_layer(layer) and layer.name == "my slide"
    assert [lyr.name for lyr in viewer.layers][:3] == [points.name, "my slide", "sketch"]
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert viewer.layers.selection.active is layer and widget.slide_layer is layer
    assert widget.magnify_button.isEnabled() and "µm/px" in widget.slide_info_label.text()
    qtbot.waitUntil(widget.open_panel.reopen_button.isHidden, timeout=5000)
    qtbot.waitUntil(
        lambda: any(layer_kind(lyr) == "annotations" for lyr in viewer.layers), timeout=10_000
    )
    # the whole slide is in view (the world changed from pixels to µm)
    assert camera_state(viewer) == pytest.approx(fitted_state(viewer))

    # the same file opened again by the builtin reader: offered again, not notified again
    (again,) = viewer.open(str(slide_copy))
    assert len(plain_image_notes(start)) == 1
    assert foreign_slide_layers(viewer) == [again]
    assert [lyr.name for lyr in widget.open_panel.reopen(again)] == [again.name]
    assert foreign_slide_layers(viewer) == []


def test_notification_action_reopens(make_napari_viewer, settings, slide_copy, data_dir, qtbot):
    viewer = make_napari_viewer(show=True)
    add_magnify_widget(viewer, autosave_delay_ms=200)
    start = note_count()
    (plain,) = viewer.open(str(slide_copy))
    (note,) = plain_image_notes(start)
    _, action = note.actions[0]
    action(None)  # what the toast's button does (it passes itself)
    assert plain not in viewer.layers
    assert [is_slide_layer(lyr) for lyr in viewer.layers if lyr.name == plain.name] == [True]


def test_reopen_refuses_layers_that_are_not_foreign_slides(make_napari_viewer, cmu_path):
    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((8, 8)))
    (ours,) = viewer.open(str(cmu_path), plugin=PLUGIN)
    for layer in (image, ours):
        with pytest.raises(ValueError, match="not a slide opened by another reader"):
            reopen_as_slide(viewer, layer)


def test_a_failed_reopen_puts_the_layer_back(make_napari_viewer, cmu_path, monkeypatch):
    from napari_magnet.slide import SlideError

    def broken(path):
        raise SlideError(path, "cannot decode (test)")

    viewer = make_napari_viewer()
    viewer.add_points([[0, 0]], name="marks")
    (plain,) = viewer.open(str(cmu_path))
    viewer.add_shapes(name="sketch")
    monkeypatch.setattr(reader_module, "open_slide", broken)
    with pytest.raises(SlideError, match="cannot decode"):
        reopen_as_slide(viewer, plain)
    assert [layer.name for layer in viewer.layers] == ["marks", plain.name, "sketch"]
    assert viewer.layers[1] is plain and foreign_slide_layers(viewer) == [plain]


# --------------------------------------------------------------------------------------------
# no pixel size
# --------------------------------------------------------------------------------------------


def test_slide_without_mpp_says_so_once(make_napari_viewer, tmp_path, data_dir, qtbot):
    path = tiff_without_mpp(tmp_path / "no-mpp.tif")
    viewer = make_napari_viewer(show=True)
    widget = add_magnify_widget(viewer, autosave_delay_ms=200)
    start = note_count()
    (layer,) = viewer.open(str(path), plugin=PLUGIN)
    viewer.open(str(path), plugin=PLUGIN)  # the same slide again: no second notification
    said = [m for m in notes_since(start) if "no pixel size" in m]
    assert len(said) == 1 and "no-mpp" in said[0] and "pixels" in said[0]
    assert tuple(layer.scale) == (1.0, 1.0) and layer.metadata["mpp"] is None
    widget.set_slide(layer)
    line = widget.slide_info_label.text()
    assert line.startswith("1,800 × 600 px") and line.endswith(NO_MPP_NOTE)
    assert slide_line(layer).endswith(NO_MPP_NOTE)


def test_slide_line_without_a_slide_says_how_to_open_one(make_napari_viewer, data_dir):
    viewer = make_napari_viewer(show=True)
    widget = add_magnify_widget(viewer)
    assert "open a slide with napari-magnet" in widget.slide_info_label.text()
    assert not widget.magnify_button.isEnabled()


# --------------------------------------------------------------------------------------------
# docking fits the view
# --------------------------------------------------------------------------------------------


def _wide_viewer(make_napari_viewer, tmp_path, qtbot):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1200, 900)
    qtbot.wait(200)
    viewer.open(str(tiff_without_mpp(tmp_path / "wide.tif")), plugin=PLUGIN)
    viewer.reset_view()
    qtbot.wait(100)
    return viewer


def test_docking_fits_the_slide(make_napari_viewer, tmp_path, data_dir, qtbot):
    viewer = _wide_viewer(make_napari_viewer, tmp_path, qtbot)
    zoom_before = camera_state(viewer)[-1]
    widget = add_magnify_widget(viewer, autosave_delay_ms=200)
    qtbot.waitUntil(widget.isVisible, timeout=5000)
    qtbot.wait(300)
    state = camera_state(viewer)
    assert state[-1] < zoom_before * 0.95  # the dock narrowed the canvas and the view followed
    assert state == pytest.approx(fitted_state(viewer))


def test_docking_keeps_a_view_the_user_chose(make_napari_viewer, tmp_path, data_dir, qtbot):
    viewer = _wide_viewer(make_napari_viewer, tmp_path, qtbot)
    camera = viewer_camera(viewer)
    camera.zoom = camera.zoom * 3
    camera.center = (0, 200, 300)
    before = camera_state(viewer)
    add_magnify_widget(viewer, autosave_delay_ms=200)
    qtbot.wait(300)
    assert camera_state(viewer) == pytest.approx(before)


# --------------------------------------------------------------------------------------------
# napari-magnet view
# --------------------------------------------------------------------------------------------


def test_view_command_parses_and_checks_paths(tmp_path, capsys, cmu_path, monkeypatch):
    args = build_parser().parse_args(["view", str(cmu_path), str(cmu_path)])
    assert args.func is cmd_view and args.slides == [str(cmu_path)] * 2
    assert build_parser().parse_args(["view"]).slides == []
    assert main(["view", str(tmp_path / "missing.svs")]) == 2
    assert "no such file" in capsys.readouterr().err
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    assert main(["view", str(text)]) == 2
    assert "not a slide" in capsys.readouterr().err
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert main(["view", str(cmu_path)]) == 2  # a clear error, not a Qt abort
    assert "no display" in capsys.readouterr().err


def test_view_opens_with_our_reader_and_docks_the_widget(
    make_napari_viewer, settings, slide_copy, data_dir, qtbot
):
    viewer = make_napari_viewer(show=True)
    viewer.window.resize(1200, 900)
    widget = open_slides_in(viewer, [slide_copy], autosave_delay_ms=200)
    (layer,) = [lyr for lyr in viewer.layers if is_slide_layer(lyr)]
    assert layer.source.reader_plugin == PLUGIN
    qtbot.waitUntil(widget.isVisible, timeout=5000)
    assert widget.slide_layer is layer and widget.magnify_button.isEnabled()
    qtbot.wait(300)
    assert camera_state(viewer) == pytest.approx(fitted_state(viewer))
