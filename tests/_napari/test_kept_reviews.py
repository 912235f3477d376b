"""A second Magnify run never loses the pathologist's reviews of the first (Xvfb, the CMU
slide, the shipped demo model, the autosave beside a copy of the slide).

Run, accept one ROI and classify and reject another, run again: the reviewed ROI layer is
kept aside as "<slide> · L1 ROIs (reviewed, run 1)" with its reviews, the new run has its own
unreviewed layers (the unreviewed ones updated in place), a notification says so, and the
autosave holds both. Reopening the slide restores the kept layer as it was. A run cancelled
right after it started gives a reviewed layer back as the slide's results, its name included.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from napari.utils.notifications import notification_manager

from napari_magnet._napari.annotations import sidecar_path
from napari_magnet._napari.layers import layer_info, layer_kind
from napari_magnet._napari.widget import demo_available
from napari_magnet.io.geojson import PROPERTIES_KEY

from .helpers import RUN_TIMEOUT, run_and_wait

MODEL = "demo" if demo_available() else "magnet3-lite"


def rois(viewer, kept=False):
    """The ROI layers, by magnifying layer: the kept ones, or the current ones."""
    found = [
        lyr
        for lyr in viewer.layers
        if layer_kind(lyr) == "rois" and bool(layer_info(lyr).get("kept")) == kept
    ]
    return sorted(found, key=lambda lyr: layer_info(lyr)["layer"])


def run(qtbot, widget):
    run_and_wait(qtbot, widget, MODEL)


def decisions(layer):
    """id → (class, review) of the shapes with a decision."""
    f = layer.features
    return {
        str(i): (str(c or ""), str(r))
        for i, c, r in zip(f["id"], f["class"], f["review"])
        if c or r != "unreviewed"
    }


def saved(side):
    """(kept snapshot, region id) → (class, review) of the ROIs in the autosave file."""
    out = {}
    for feat in json.loads(side.read_text())["features"]:
        ours = feat["properties"].get(PROPERTIES_KEY, {})
        if ours.get("kind") == "roi":
            klass = (feat["properties"].get("classification") or {}).get("name", "")
            out[ours.get("kept", 0), ours["region_id"]] = (klass, ours.get("review"))
    return out


@pytest.fixture(params=["add_magnify_widget", "Plugins menu"])
def rig(request, make_napari_viewer, qtbot, slide_copy, tmp_path, monkeypatch):
    """The slide open, the widget docked by ``add_magnify_widget`` — or from the Plugins
    menu, which hands the widget a proxy of the viewer."""
    if request.param == "add_magnify_widget":
        return request.getfixturevalue("setup")
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    viewer = make_napari_viewer(show=True)
    (slide,) = viewer.open(str(slide_copy), plugin="napari-magnet")
    _, widget = viewer.window.add_plugin_dock_widget("napari-magnet", "Magnify")
    qtbot.waitUntil(lambda: any(layer_kind(x) == "annotations" for x in viewer.layers))
    return viewer, widget, slide


def test_a_second_run_keeps_the_reviews_of_the_first(rig, qtbot):
    viewer, widget, slide = rig
    path = slide.metadata["path"]
    saver, side = widget.autosavers[path], sidecar_path(path)
    run(qtbot, widget)
    first = rois(viewer)
    l1, deeper = first[0], first[1:]
    assert l1.nshapes >= 2 and deeper
    l1.selected_data = {0}
    assert widget.set_review("accepted", l1) == 1
    l1.selected_data = {1}
    assert widget.set_class("Tumor", l1) == 1
    assert widget.set_review("rejected", l1) == 1
    reviews = decisions(l1)
    ids = list(l1.features["id"])
    assert reviews == {ids[0]: ("", "accepted"), ids[1]: ("Tumor", "rejected")}
    boxes = [np.array(d) for d in l1.data]
    qtbot.waitUntil(lambda: side.exists() and not saver.pending, timeout=20_000)
    saves = saver.saves

    n0 = len(notification_manager.records)
    run(qtbot, widget)
    qtbot.wait(500)  # the commit's queued removals and renames

    # in the viewer: the reviewed layer kept as it was, aside
    kept_name = f"{slide.name} · L1 ROIs (reviewed, run 1)"
    assert rois(viewer, kept=True) == [l1]
    assert l1 in viewer.layers and l1.name == kept_name
    assert decisions(l1) == reviews
    assert all(np.array_equal(a, b) for a, b in zip(l1.data, boxes))
    # the new run: its own L1 layer, the unreviewed deeper layers written in place
    current = rois(viewer)
    assert [layer_info(lyr)["layer"] for lyr in current] == [
        layer_info(lyr)["layer"] for lyr in first
    ]
    assert current[0] is not l1 and current[0].name == f"{slide.name} · L1 ROIs"
    assert all(a is b for a, b in zip(current[1:], deeper))
    assert not any(decisions(lyr) for lyr in current)
    # stacked in lineage order, bottom to top: the kept layer, then L1 … Lk (the new L1 is
    # not left on top of the deeper layers it joined)
    stack = [lyr for lyr in viewer.layers if layer_kind(lyr) == "rois"]
    assert stack == [l1, *current]
    said = [str(n.message) for n in notification_manager.records[n0:]]
    assert any("reviews" in m and kept_name in m for m in said), said

    # in the autosave: the kept reviews, and the new run's ROIs
    qtbot.waitUntil(lambda: saver.saves > saves and not saver.pending, timeout=20_000)
    in_file = saved(side)
    assert {rid: s for (k, rid), s in in_file.items() if k == 1} == {
        rid: decisions(l1).get(rid, ("", "unreviewed")) for rid in ids
    }
    assert sum(1 for k, _ in in_file if k == 0) == sum(lyr.nshapes for lyr in current)

    # reopened: the kept layer comes back with its reviews, beside the last run's ROIs
    viewer.layers.remove(slide)  # flushes the autosave
    viewer.layers.clear()
    (slide,) = viewer.open(path, plugin="napari-magnet")
    qtbot.waitUntil(lambda: bool(rois(viewer, kept=True)), timeout=10_000)
    (restored,) = rois(viewer, kept=True)
    assert restored.name == kept_name and decisions(restored) == reviews
    assert len(rois(viewer)) == len(current) and not any(decisions(x) for x in rois(viewer))


def test_a_cancelled_run_gives_a_reviewed_layer_back(setup, qtbot):
    viewer, widget, slide = setup
    run(qtbot, widget)
    names = [lyr.name for lyr in viewer.layers]
    l1 = rois(viewer)[0]
    l1.selected_data = {0}
    assert widget.set_review("accepted", l1) == 1
    widget.set_model(MODEL)
    assert widget.run_magnify() is not None
    assert l1.name.endswith("(reviewed, run 1)")  # kept aside before the run writes
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    assert [lyr.name for lyr in viewer.layers] == names
    assert rois(viewer)[0] is l1 and not rois(viewer, kept=True)
    assert decisions(l1) == {str(l1.features["id"][0]): ("", "accepted")}
