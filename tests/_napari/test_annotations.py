"""Review in a real viewer: the Annotations layer, classes, review keys, autosave, restore."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt

from napari_magnet._napari.annotations import (
    CLASS_KEYS,
    REVIEW_KEYS,
    fallback_path,
    sidecar_path,
)
from napari_magnet._napari.layers import layer_kind
from napari_magnet._napari.widget import add_magnify_widget

DELAY_MS = 200


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    path = tmp_path / "data"
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(path))
    return path


def open_with_widget(make_napari_viewer, qtbot, path):
    viewer = make_napari_viewer(show=True)
    widget = add_magnify_widget(viewer, autosave_delay_ms=DELAY_MS)
    (slide,) = viewer.open(str(path), plugin="napari-magnet")
    qtbot.waitUntil(lambda: annotations_of(viewer) is not None, timeout=10_000)
    return viewer, widget, slide


def annotations_of(viewer):
    found = [lyr for lyr in viewer.layers if layer_kind(lyr) == "annotations"]
    return found[0] if found else None


def draw(layer, slide, boxes_px, shape_type="rectangle"):
    """Add shapes as a user would: level-0 px boxes → world µm vertices."""
    mpp_x, mpp_y = slide.metadata["mpp"]
    for x0, y0, x1, y1 in boxes_px:
        if shape_type == "polygon":
            verts = np.array([[y0, x0], [y0, x1], [y1, (x0 + x1) / 2]]) * [mpp_y, mpp_x]
        else:
            verts = np.array([[y0, x0], [y1, x1]]) * [mpp_y, mpp_x]
        layer.add(verts, shape_type=shape_type)


def press(viewer, qtbot, key, modifier):
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.keyClick(canvas, key, modifier)


def test_annotations_layer_classes_keys_and_styles(make_napari_viewer, qtbot, slide_copy, data_dir):
    viewer, widget, slide = open_with_widget(make_napari_viewer, qtbot, slide_copy)
    layer = annotations_of(viewer)
    assert layer.name == "CMU-1-Small-Region · Annotations"
    assert layer.metadata["mpp"] == tuple(slide.metadata["mpp"])
    assert layer.metadata["slide_path"] == slide.metadata["path"]
    widget.class_combo.setCurrentText("Normal")
    draw(layer, slide, [(100, 100, 400, 300), (500, 600, 900, 1000)])
    draw(layer, slide, [(1000, 1500, 1400, 2000)], "polygon")
    assert list(layer.features["class"]) == ["Normal"] * 3  # new shapes take the class
    assert list(layer.features["review"]) == ["unreviewed"] * 3

    viewer.layers.selection.active = layer
    layer.mode = "select"
    layer.selected_data = {0}
    press(viewer, qtbot, Qt.Key_A, Qt.ShiftModifier)
    layer.selected_data = {1}
    press(viewer, qtbot, Qt.Key_R, Qt.ShiftModifier)
    press(viewer, qtbot, Qt.Key_1, Qt.AltModifier)  # class 1 = Tumor
    layer.selected_data = {2}
    press(viewer, qtbot, Qt.Key_3, Qt.AltModifier)  # class 3 = Other
    assert layer.nshapes == 3  # napari's own "3" (delete) did not fire
    assert list(layer.features["review"]) == ["accepted", "rejected", "unreviewed"]
    assert list(layer.features["class"]) == ["Normal", "Tumor", "Other"]
    layer.selected_data = {1}
    press(viewer, qtbot, Qt.Key_U, Qt.ShiftModifier)
    assert layer.features["review"][1] == "unreviewed"
    # widget buttons do the same
    layer.selected_data = {2}
    assert widget.set_review("rejected") == 1
    widget.set_classes(["Tumor", "Stroma"])
    assert widget.class_combo.count() == 2
    assert widget.set_class("Stroma") == 1
    assert list(layer.features["class"]) == ["Normal", "Tumor", "Stroma"]
    # styles: accepted bold, rejected thin and grey
    w = np.asarray(layer.edge_width)
    assert w[0] > w[1] > w[2]
    edge = np.asarray(layer.edge_color)
    assert edge[2][0] == pytest.approx(edge[2][1]) == pytest.approx(edge[2][2])
    assert edge[0][1] > edge[0][0]  # Normal is green
    # every key we bind is free in napari's Shapes keymap
    from napari.utils.shortcuts import default_shortcuts

    taken = {
        str(kb)
        for action, kbs in default_shortcuts.items()
        if "shape" in action or "vertex" in action or action.endswith("_mode")
        for kb in kbs
    }
    ours = {k.replace("-", "+") for k in (*REVIEW_KEYS, *CLASS_KEYS)}
    assert not ours & taken


def test_autosave_survives_a_crash_and_restores_rois(
    make_napari_viewer, qtbot, slide_copy, data_dir
):
    viewer, widget, slide = open_with_widget(make_napari_viewer, qtbot, slide_copy)
    layer = annotations_of(viewer)
    draw(layer, slide, [(100, 100, 400, 300)])
    draw(layer, slide, [(800, 900, 1200, 1400)], "polygon")
    layer.selected_data = {1}
    widget.set_review("accepted", layer)
    widget.set_class("Tumor", layer)
    # a run's ROIs with a reviewed one
    widget.set_model("ats")
    widget.set_device("cpu")
    widget.patches_spin.setValue(5)
    widget.run_magnify()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=240_000)
    (rois,) = [lyr for lyr in viewer.layers if layer_kind(lyr) == "rois"]
    rois.selected_data = {3}
    widget.set_review("rejected", rois)
    side = sidecar_path(slide_copy)
    saver = widget.autosavers[slide.metadata["path"]]
    qtbot.waitUntil(lambda: side.exists() and not saver.pending, timeout=10_000)
    assert not fallback_path(slide_copy).exists()
    doc = json.loads(side.read_text())
    assert len(doc["features"]) == 2 + 5
    world = [np.asarray(d).copy() for d in layer.data]
    roi_world = [np.asarray(d).copy() for d in rois.data]

    # "crash": no flush, no goodbye — a new viewer opens the slide again
    saver.stop()
    viewer2, widget2, slide2 = open_with_widget(make_napari_viewer, qtbot, slide_copy)
    restored = annotations_of(viewer2)
    assert restored.nshapes == 2
    for a, b in zip(world, restored.data):
        np.testing.assert_allclose(np.asarray(b)[:, -2:].min(0), a[:, -2:].min(0), atol=1e-6)
        np.testing.assert_allclose(np.asarray(b)[:, -2:].max(0), a[:, -2:].max(0), atol=1e-6)
    assert list(restored.shape_type) == ["rectangle", "polygon"]
    assert list(restored.features["class"]) == ["Tumor", "Tumor"]  # default class, then set
    assert list(restored.features["review"]) == ["unreviewed", "accepted"]
    (rois2,) = [lyr for lyr in viewer2.layers if layer_kind(lyr) == "rois"]
    assert rois2.nshapes == 5 and rois2.name == "CMU-1-Small-Region · L1 ROIs"
    assert list(rois2.features["review"]) == ["unreviewed"] * 3 + ["rejected", "unreviewed"]
    for a, b in zip(roi_world, rois2.data):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_read_only_slide_folder_saves_in_the_data_dir(
    make_napari_viewer, qtbot, slide_copy, data_dir
):
    folder = slide_copy.parent
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    viewer, widget, slide = open_with_widget(make_napari_viewer, qtbot, slide_copy)
    layer = annotations_of(viewer)
    draw(layer, slide, [(300, 300, 600, 700)])
    target = fallback_path(slide_copy)
    assert str(target).startswith(str(data_dir))
    qtbot.waitUntil(target.exists, timeout=10_000)
    assert not sidecar_path(slide_copy).exists()
    assert sorted(os.listdir(folder)) == [slide_copy.name]
    viewer2, widget2, slide2 = open_with_widget(make_napari_viewer, qtbot, slide_copy)
    assert annotations_of(viewer2).nshapes == 1


def test_unreadable_autosave_is_reported_and_kept_aside(
    make_napari_viewer, qtbot, slide_copy, data_dir
):
    side = sidecar_path(slide_copy)
    side.write_text('{"type": "FeatureCollection", "features": [oops')
    n0 = len(notification_manager.records)
    viewer, widget, slide = open_with_widget(make_napari_viewer, qtbot, slide_copy)
    messages = [str(n.message) for n in notification_manager.records[n0:]]
    assert any("could not restore" in m and side.name in m for m in messages)
    assert annotations_of(viewer).nshapes == 0
    assert side.with_name(side.name + ".unreadable").exists()
    draw(annotations_of(viewer), slide, [(10, 10, 50, 50)])
    qtbot.waitUntil(side.exists, timeout=10_000)
    assert len(json.loads(side.read_text())["features"]) == 1


def test_nothing_is_written_next_to_an_untouched_slide(
    make_napari_viewer, qtbot, slide_copy, data_dir
):
    viewer, widget, slide = open_with_widget(make_napari_viewer, qtbot, slide_copy)
    qtbot.wait(3 * DELAY_MS)
    assert sorted(os.listdir(slide_copy.parent)) == [slide_copy.name]
    assert not data_dir.exists() or not any(data_dir.rglob("*.geojson"))
