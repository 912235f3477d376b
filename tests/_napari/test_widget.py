"""The Magnify widget in a real viewer (Xvfb): runs, overlays, cancel, boxes, errors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import notification_manager

from napari_magnet._napari.layers import layer_info, layer_kind
from napari_magnet._napari.widget import (
    MagnifyWidget,
    add_magnify_widget,
    demo_available,
    model_choices,
)

from .helpers import RUN_TIMEOUT, ours, run_and_wait


def inside(inner, outer, tol=1e-6):
    return (
        inner[:, 0].min() >= outer[:, 0].min() - tol
        and inner[:, 1].min() >= outer[:, 1].min() - tol
        and inner[:, 0].max() <= outer[:, 0].max() + tol
        and inner[:, 1].max() <= outer[:, 1].max() + tol
    )


def test_widget_lists_models_devices_and_is_a_manifest_widget(make_napari_viewer):
    from npe2 import PluginManifest

    viewer = make_napari_viewer()
    widget = add_magnify_widget(viewer)
    names = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    from napari_magnet.models.registry import shipped_checkpoints

    shipped = list(shipped_checkpoints())  # the trained models first
    assert ("demo" in shipped) == demo_available()
    assert names[: len(shipped) + 4] == shipped + ["magnet3", "magnet4", "magnet3-lite", "ats"]
    assert names[-1].startswith("Checkpoint")
    assert names[:-1] == model_choices()
    import torch

    cuda_item = widget.device_combo.model().item(2)
    assert cuda_item.text() == "CUDA"
    assert cuda_item.isEnabled() == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert cuda_item.toolTip()
    # the patches override is only for attention sampling
    widget.set_model("magnet3-lite")
    assert not widget.patches_spin.isEnabled()
    widget.set_model("ats")
    assert widget.patches_spin.isEnabled()
    assert not widget.magnify_button.isEnabled()  # no slide yet
    assert not widget.cancel_button.isEnabled()
    manifest = PluginManifest.from_distribution("napari-magnet")
    commands = {c.id: c.python_name for c in manifest.contributions.commands}
    (contrib,) = manifest.contributions.widgets
    assert commands[contrib.command].endswith("widget:MagnifyWidget")
    assert isinstance(widget, MagnifyWidget)


def test_widget_is_a_composition_of_small_panels(make_napari_viewer):
    from napari_magnet._napari._qt import ExportPanel, MagnifyPanel, ReviewPanel
    from napari_magnet._napari.run_controller import RunController, RunState
    from napari_magnet.models.registry import DEMO_CHECKPOINT, family_of_spec

    viewer = make_napari_viewer()
    widget = add_magnify_widget(viewer)
    assert isinstance(widget.magnify_panel, MagnifyPanel)
    assert isinstance(widget.review_panel, ReviewPanel)
    assert isinstance(widget.export_panel, ExportPanel)
    assert isinstance(widget.controller, RunController)
    assert widget.model_combo is widget.magnify_panel.model_combo
    assert widget.class_combo is widget.review_panel.class_combo
    assert widget.export_button is widget.export_panel.export_button
    assert widget.state is RunState.IDLE and not widget.is_running
    assert widget.current_run is None and widget.last_runs == {}
    # a checkpoint path: the Patches box follows its family (read from the checkpoint JSON)
    if DEMO_CHECKPOINT.is_file():
        widget.set_checkpoint(str(DEMO_CHECKPOINT))
        assert widget.model_spec == str(DEMO_CHECKPOINT)
        assert (
            widget.patches_spin.isEnabled()
            is family_of_spec(str(DEMO_CHECKPOINT)).adjustable_patches
        )
    with pytest.raises(ValueError, match="unknown model"):
        widget.set_model("no-such-model")
    with pytest.raises(ValueError, match="unknown device"):
        widget.set_device("tpu")
    # no slide: Magnify reports instead of starting
    assert widget.run_magnify() is None


def test_magnet_run_adds_layers_step_by_step_aligned_on_the_slide(setup, qtbot):
    viewer, widget, slide = setup
    viewer.reset_view()
    inserted = []
    widget.set_model("magnet3-lite")
    widget.set_device("cpu")
    assert widget.run_magnify() is not None
    run = widget.current_run

    def on_insert(event):
        if layer_kind(event.value) == "rois":
            inserted.append(
                (layer_info(event.value)["layer"], len(run.steps), run.result is not None)
            )

    viewer.layers.events.inserted.connect(on_insert)
    assert widget.cancel_button.isEnabled() and not widget.magnify_button.isEnabled()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    assert widget.magnify_button.isEnabled() and not widget.cancel_button.isEnabled()
    # layers arrive step by step: layer k's ROIs once its step is in, layer 1's well before
    # the run ends (computing layers 2 and 3 takes longer than adding a layer)
    assert [k for k, _, _ in inserted] == [1, 2, 3]
    assert all(n >= k for k, n, _ in inserted)
    assert inserted[0][2] is False
    rois = ours(viewer, "rois")
    assert [lyr.name for lyr in rois] == [f"CMU-1-Small-Region · L{k} ROIs" for k in (1, 2, 3)]
    assert [lyr.nshapes for lyr in rois] == [3, 6, 18]
    # deeper layers above shallower ones
    idx = [viewer.layers.index(lyr) for lyr in rois]
    assert idx == sorted(idx)
    # every rectangle inside the slide's world extent, children inside their parents
    width, height = slide.metadata["slide"].dimensions
    mpp_x, mpp_y = slide.metadata["mpp"]
    extent = np.array([[0, 0], [height * mpp_y, width * mpp_x]])
    boxes = {}
    for lyr in rois:
        assert lyr.metadata["mpp"] == (mpp_x, mpp_y)
        assert lyr.metadata["slide_path"] == slide.metadata["path"]
        assert layer_info(lyr)["committed"] is True
        assert set(lyr.features.columns) >= {
            "id",
            "parent",
            "layer",
            "scale",
            "level",
            "attention_mass",
            "aux_probability",
        }
        assert list(lyr.text.values) == list(lyr.features["id"])
        for rect, rid, parent in zip(lyr.data, lyr.features["id"], lyr.features["parent"]):
            assert inside(rect, extent, tol=1e-3)
            if parent:
                assert inside(rect, boxes[parent], tol=1e-3), (rid, parent)
            boxes[rid] = rect
    # attention overlays: one per magnifying layer, aligned with the box they cover
    att = ours(viewer, "attention")
    assert [lyr.name for lyr in att] == [f"CMU-1-Small-Region · L{k} attention" for k in (1, 2, 3)]
    assert [layer_info(lyr)["maps"] for lyr in att] == [1, 3, 6]
    for lyr in att:
        x0, y0, x1, y1 = lyr.metadata["box"]
        # napari's world extent runs between pixel centres: pixel edges are half a step out
        (r0, c0), (r1, c1) = lyr.extent.world
        half_r, half_c = np.asarray(lyr.scale) / 2
        assert (r0 - half_r, c0 - half_c, r1 + half_r, c1 + half_c) == pytest.approx(
            (y0 * mpp_y, x0 * mpp_x, y1 * mpp_y, x1 * mpp_x), rel=1e-6, abs=1e-6
        )
        # cropped to the slide: every pixel centre lies on it
        assert r0 >= 0 and c0 >= 0 and r1 <= height * mpp_y and c1 <= width * mpp_x
    # stacking: L1 attention < L2 attention < … < L1 ROIs < L2 ROIs < …: every outline is
    # drawn over every overlay
    order = [viewer.layers.index(lyr) for lyr in [*att, *rois]]
    assert order == sorted(order)
    (cov,) = ours(viewer, "coverage")
    assert isinstance(cov, Labels) and viewer.layers.index(cov) == viewer.layers.index(slide) + 1
    assert "tissue examined" in widget.result_label.text()
    assert widget.result_label.text().startswith("magnet3-lite: p = ")
    assert "px processed" in widget.result_label.text()
    assert widget.progress.value() == widget.progress.maximum() == 3

    # the overlays change the rendered canvas
    viewer.reset_view()
    shown = viewer.screenshot(canvas_only=True, flash=False)
    for lyr in att:
        lyr.visible = False
    hidden = viewer.screenshot(canvas_only=True, flash=False)
    diff = np.abs(shown[..., :3].astype(int) - hidden[..., :3].astype(int))
    assert (diff.max(axis=-1) > 30).mean() > 0.05


def test_ats_run_and_a_second_run_replaces_the_first(setup, qtbot):
    viewer, widget, slide = setup
    run_and_wait(qtbot, widget, "ats")
    (rois,) = ours(viewer, "rois")
    assert rois.nshapes == 20 and rois.name == "CMU-1-Small-Region · L1 ROIs"
    assert len(ours(viewer, "attention")) == 1
    first = set(ours(viewer, "rois") + ours(viewer, "attention"))
    # the patches override reaches the model
    widget.patches_spin.setValue(7)
    run_and_wait(qtbot, widget, "ats")
    (rois2,) = ours(viewer, "rois")
    assert rois2.nshapes == 7 and rois2.name == "CMU-1-Small-Region · L1 ROIs"
    # the second run's results replace the first's (written into the same layers: no stall)
    tag = widget.last_runs[slide.metadata["path"]].tag
    assert len(ours(viewer, "rois")) == 1 and len(ours(viewer, "attention")) == 1
    assert all(
        layer_info(lyr)["run"] == tag for lyr in ours(viewer, "rois") + ours(viewer, "attention")
    )
    assert first >= set(ours(viewer, "rois") + ours(viewer, "attention")) or not first & set(
        viewer.layers
    )
    assert len(ours(viewer, "coverage")) == 1


def test_two_level_ats_run_streams_regions_then_patches(setup, qtbot):
    viewer, widget, slide = setup
    widget.patches_spin.setValue(3)  # patches per region for a two-level model
    run_and_wait(qtbot, widget, "ats-2level")
    l1, l2 = ours(viewer, "rois")
    assert (l1.name, l2.name) == ("CMU-1-Small-Region · L1 ROIs", "CMU-1-Small-Region · L2 ROIs")
    assert l1.nshapes == 5 and l2.nshapes == 15
    assert list(l2.features["parent"]) == [p for p in l1.features["id"] for _ in range(3)]
    assert list(l2.features["id"])[:3] == ["1.1", "1.2", "1.3"]
    assert [layer_info(lyr)["maps"] for lyr in ours(viewer, "attention")] == [1, 5]
    assert widget.result_label.text().startswith("ats-2level: p = ")


def test_cancel_ten_times_leaves_no_worker_and_no_layer(setup, qtbot):
    from superqt.utils._qthreading import WorkerBase

    viewer, widget, slide = setup
    widget.set_model("magnet3-lite")
    widget.set_device("cpu")
    before = [lyr.name for lyr in viewer.layers]
    outcomes = []
    widget.run_finished.connect(outcomes.append)
    for i in range(10):
        worker = widget.run_magnify()
        run = widget.current_run
        shown = []

        def cancel_on_first_step(n, run=run, shown=shown):
            # right after the first step's layers are in the viewer (GUI thread)
            if not run.cancelled:
                shown.append(len(ours(viewer, "rois")))
                widget.cancel()
                # hidden at once, removed one per event-loop turn
                shown.append(
                    sum(
                        lyr.visible
                        for kind in ("rois", "attention", "coverage")
                        for lyr in ours(viewer, kind)
                    )
                )
                shown.append(widget.cancel_button.isEnabled())

        widget.step_shown.connect(cancel_on_first_step)
        qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
        widget.step_shown.disconnect(cancel_on_first_step)
        # the first step was shown, and its layers went at once with Cancel
        assert shown == [1, 0, False]
        assert run.cancelled and run.cancel_event.is_set()
        # the worker is gone and its generator closed (it closed the magnify stream itself)
        qtbot.waitUntil(lambda: not WorkerBase._worker_set, timeout=10_000)
        assert inspect.getgeneratorstate(worker._gen) == inspect.GEN_CLOSED
        assert outcomes == ["cancelled"] * (i + 1)
        assert [lyr.name for lyr in viewer.layers] == before
        assert widget.magnify_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert not widget.last_runs
    qtbot.waitUntil(lambda: not WorkerBase._worker_set, timeout=10_000)


def test_magnify_inside_a_selected_box(setup, qtbot):
    viewer, widget, slide = setup
    mpp_x, mpp_y = slide.metadata["mpp"]
    # a box in level-0 px x 500..1700, y 900..2400, drawn in a shapes layer of its own scale
    box_world = np.array([[900 * mpp_y, 500 * mpp_x], [2400 * mpp_y, 1700 * mpp_x]])
    drawn = viewer.add_shapes(
        [box_world / 2.0], shape_type="rectangle", scale=(2.0, 2.0), name="my box"
    )
    drawn.selected_data = {0}
    viewer.layers.selection.active = drawn
    assert widget.selected_box() == pytest.approx((500, 900, 1700, 2400))
    run_and_wait(qtbot, widget)
    assert widget.region_label.text().startswith("Region: selected box")
    l1 = next(lyr for lyr in ours(viewer, "rois") if layer_info(lyr)["layer"] == 1)
    assert l1.nshapes == 3
    for rect in l1.data:
        assert inside(rect, box_world, tol=1e-3)
    assert widget.last_runs[slide.metadata["path"]].box == pytest.approx((500, 900, 1700, 2400))


def test_failed_run_reports_and_keeps_earlier_results(setup, qtbot, tmp_path):
    viewer, widget, slide = setup
    run_and_wait(qtbot, widget, "ats")
    earlier = [lyr.name for lyr in viewer.layers]
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    (tmp_path / "broken.json").write_text("{not json")
    widget.set_checkpoint(str(bad))
    n0 = len(notification_manager.records)
    assert widget.run_magnify() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    errors = [n for n in notification_manager.records[n0:] if "failed" in str(n.message)]
    assert errors and "broken" in str(errors[-1].message)
    assert [lyr.name for lyr in viewer.layers] == earlier
    assert widget.result_label.text().startswith("Failed:")
    assert widget.magnify_button.isEnabled()
    # the viewer still works: another run succeeds
    run_and_wait(qtbot, widget, "ats")
    assert len(ours(viewer, "rois")) == 1


def test_layer_types_and_metadata_of_a_run(setup, qtbot):
    viewer, widget, slide = setup
    run_and_wait(qtbot, widget, "ats")
    for lyr in ours(viewer, "rois") + ours(viewer, "attention") + ours(viewer, "coverage"):
        assert isinstance(lyr, (Shapes, Image, Labels))
        assert lyr.metadata["slide_path"] == slide.metadata["path"]
        assert lyr.metadata["mpp"] == tuple(slide.metadata["mpp"])


def test_importing_an_empty_collection_adds_an_empty_layer(setup, tmp_path):
    viewer, widget, slide = setup
    empty = tmp_path / "annotations.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    layer = widget.import_geojson(str(empty))
    assert layer is not None and layer.nshapes == 0
    assert layer in viewer.layers
