"""The widget as a user docks it, from the Plugins menu: napari then hands it a proxy of the
viewer whose layers are new proxy objects on every access (identity and ``id()`` differ for
one layer). A run's layers must survive its commit, a second run must replace them, and a
cancelled run must leave the first run's results."""

from __future__ import annotations

import json

import pytest

from napari_magnet._napari.annotations import sidecar_path
from napari_magnet._napari.layers import layer_info, layer_kind
from napari_magnet.io.geojson import PROPERTIES_KEY

from .helpers import ours, run_and_wait

RUN_TIMEOUT = 180_000


@pytest.fixture
def docked(make_napari_viewer, qtbot, slide_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    viewer = make_napari_viewer(show=True)
    (slide,) = viewer.open(str(slide_copy), plugin="napari-magnet")
    _, widget = viewer.window.add_plugin_dock_widget("napari-magnet", "Magnify")
    # the route under test: napari wraps the viewer it gives a plugin's widget
    assert type(widget.viewer).__name__ == "PublicOnlyProxy"
    qtbot.waitUntil(
        lambda: any(layer_kind(lyr) == "annotations" for lyr in viewer.layers), timeout=10_000
    )
    return viewer, widget, slide


def run(qtbot, widget, model):
    run_and_wait(qtbot, widget, model, timeout=RUN_TIMEOUT)
    qtbot.wait(1500)  # queued layer operations (removals come a turn later)


@pytest.mark.parametrize("model", ["magnet3-lite", "zoommil"])
def test_a_run_from_the_plugins_menu_keeps_its_layers(docked, qtbot, model):
    viewer, widget, slide = docked
    run(qtbot, widget, model)
    assert widget.result_label.text().startswith(f"{model}: p = ")
    rois, att = ours(viewer, "rois"), ours(viewer, "attention")
    assert [layer_info(lyr)["layer"] for lyr in rois] == [1, 2, 3]
    assert len(att) == 3 and len(ours(viewer, "coverage")) == 1
    assert all(layer_info(lyr)["committed"] for lyr in rois)
    assert all(lyr.visible for lyr in rois)
    first = [lyr.name for lyr in viewer.layers]

    # a second run writes into the first run's layers: the same layers, no duplicates
    run(qtbot, widget, model)
    assert [lyr.name for lyr in viewer.layers] == first
    assert len(ours(viewer, "rois")) == 3 and all(lyr.visible for lyr in ours(viewer, "rois"))

    # a run cancelled at its first step leaves the previous results as they were
    outcomes = []
    widget.run_finished.connect(outcomes.append)
    widget.step_shown.connect(lambda n: widget.cancel())
    widget.set_model(model)
    assert widget.run_magnify() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    qtbot.wait(1500)
    assert outcomes == ["cancelled"]
    assert [lyr.name for lyr in viewer.layers] == first
    assert all(lyr.visible for lyr in ours(viewer, "rois"))
    assert slide in viewer.layers

    # reviewing an ROI is saved beside the slide
    l1 = ours(viewer, "rois")[0]
    l1.selected_data = {0}
    widget.set_review("accepted", l1)
    side = sidecar_path(slide.metadata["path"])
    saver = widget.autosavers[slide.metadata["path"]]
    qtbot.waitUntil(lambda: side.exists() and not saver.pending, timeout=20_000)
    features = json.loads(side.read_text())["features"]
    reviews = [f["properties"].get(PROPERTIES_KEY, {}).get("review") for f in features]
    assert reviews.count("accepted") == 1
