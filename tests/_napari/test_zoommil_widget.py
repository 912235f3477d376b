"""ZoomMIL through the Magnify widget in a real viewer (Xvfb), as a pathologist would use it.

A generated 4096² slide at 0.5 µm/px with a micro-metastasis, opened with our reader: the
widget lists "zoommil" and "abmil" (fixed patches), a zoommil run shows three nested ROI
layers (8 → 4 → 1 µm/px) and their attention maps on the slide, hovering a layer-3 ROI
describes it, a second run replaces the first, Cancel leaves the widget usable and abmil runs
(one ROI layer). One screenshot of the canvas after the zoommil run is checked for the ROI
outlines and saved to ``/tmp/zoommil-shot.png`` for a look.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from napari_magnet._napari.layers import layer_info
from napari_magnet._napari.widget import add_magnify_widget
from napari_magnet.models.zoommil import ZOOMMIL_CONFIGS
from napari_magnet.models.zoommil.magnify import LAST_STEP_PATCHES

from .helpers import RUN_TIMEOUT, hover, ours, run_and_wait

SIDE, MPP = 4096, 0.5
SHOT = "/tmp/zoommil-shot.png"
#: RGB distance within which a canvas pixel counts as an ROI edge colour (see outline_contrast)
EDGE_TOL = 60.0


@pytest.fixture(scope="module")
def lesion_slide(tmp_path_factory):
    """A real pyramidal JPEG TIFF with a micro-metastasis (and its ground-truth sidecar)."""
    from napari_magnet.synth import SyntheticSlideSpec
    from napari_magnet.synth.writing import generate_slide

    path = tmp_path_factory.mktemp("zoommil-slide") / "lesion.tif"
    spec = SyntheticSlideSpec(SIDE, SIDE, MPP, seed=3, lesion_kind="micro")
    info = generate_slide(path, spec, workers=1)
    assert any(lesion.is_tumour for lesion in info.lesions)
    return path


@pytest.fixture
def zoom_setup(make_napari_viewer, qtbot, lesion_slide, tmp_path, monkeypatch):
    """A shown (large) viewer, the widget docked, a writable copy of the slide open."""
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "slides"
    folder.mkdir()
    target = folder / lesion_slide.name
    shutil.copyfile(lesion_slide, target)
    viewer = make_napari_viewer(show=True)
    # the docks take ~820 px: this leaves a ~650 × 1050 px canvas (ROI edges ~1 px at Home)
    viewer.window.resize(1500, 1100)
    widget = add_magnify_widget(viewer, autosave_delay_ms=200)
    (slide,) = viewer.open(str(target), plugin="napari-magnet")
    qtbot.waitUntil(lambda: bool(ours(viewer, "annotations")), timeout=10_000)
    return viewer, widget, slide


def inside(inner, outer, tol=1e-3):
    """Whether the (N, 2) world vertices ``inner`` lie in the box of ``outer``."""
    inner, outer = np.asarray(inner), np.asarray(outer)
    return bool(
        (inner.min(axis=0) >= outer.min(axis=0) - tol).all()
        and (inner.max(axis=0) <= outer.max(axis=0) + tol).all()
    )


def slide_extent(slide):
    width, height = slide.metadata["slide"].dimensions
    mpp_x, mpp_y = slide.metadata["mpp"]
    return np.array([[0.0, 0.0], [height * mpp_y, width * mpp_x]])


def camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def to_canvas(viewer, shape, world_rc):
    """Canvas (row, col) of world (row, col) points, for a canvas of ``shape``."""
    center = np.asarray(camera(viewer).center)[-2:]
    zoom = camera(viewer).zoom
    return (np.asarray(world_rc, float) - center) * zoom + np.asarray(shape[:2]) / 2 - 0.5


def outline_points(rect, n=24, margin=0.15):
    """World points along the four sides of a rectangle, away from its corners (labels)."""
    (r0, c0), (r1, c1) = np.asarray(rect).min(axis=0), np.asarray(rect).max(axis=0)
    t = np.linspace(margin, 1 - margin, n)
    rows, cols = r0 + t * (r1 - r0), c0 + t * (c1 - c0)
    return np.concatenate(
        [
            np.stack([np.full(n, r0), cols], 1),
            np.stack([np.full(n, r1), cols], 1),
            np.stack([rows, np.full(n, c0)], 1),
            np.stack([rows, np.full(n, c1)], 1),
        ]
    )


def colour_hits(img, points, colours, reach=2, tol=30.0):
    """Per canvas point: is a pixel within ``reach`` of it within ``tol`` of a colour?"""
    hits = []
    for r, c in np.round(points).astype(int):
        patch = img[max(r - reach, 0) : r + reach + 1, max(c - reach, 0) : c + reach + 1]
        if patch.size == 0:
            hits.append(False)
            continue
        d = np.linalg.norm(patch[..., None, :] - colours[None, None], axis=-1)
        hits.append(bool((d <= tol).any()))
    return np.array(hits)


def home_screenshot(viewer, qtbot, save=None):
    """The canvas at Home (the whole slide in view) as float RGB; a copy saved to ``save``."""
    viewer.reset_view()
    qtbot.wait(100)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    if save:
        import imageio.v3 as iio

        iio.imwrite(save, shot)
    return shot[..., :3].astype(float)


def outline_contrast(viewer, img, layer, tol=EDGE_TOL):
    """Per ROI of ``layer``: its id, the fraction of its outline near which its own edge
    colour is drawn, and the same fraction on the outline of its half-size inner box.

    An ROI edge is a ~1 px line (at Home) drawn at the Shapes layer's opacity (0.7) over the
    attention overlay: its pixels lie within ``tol`` of the edge colour, not on it.
    """
    out = []
    for rect, rid, rgba in zip(layer.data, layer.features["id"], layer.edge_color):
        rect = np.asarray(rect)
        own = np.asarray(rgba[:3])[None] * 255
        inner = rect.mean(axis=0) + (rect - rect.mean(axis=0)) / 2
        on = colour_hits(img, to_canvas(viewer, img.shape, outline_points(rect)), own, tol=tol)
        off = colour_hits(img, to_canvas(viewer, img.shape, outline_points(inner)), own, tol=tol)
        out.append((rid, float(on.mean()), float(off.mean())))
    return out


def test_zoommil_and_abmil_are_listed_with_fixed_patches(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = add_magnify_widget(viewer)
    names = [widget.model_combo.itemText(i) for i in range(widget.model_combo.count())]
    assert "zoommil" in names[:-1] and "abmil" in names[:-1]
    widget.set_model("ats")
    assert widget.patches_spin.isEnabled()  # an adjustable family, for contrast
    widget.patches_spin.setValue(7)
    for name in ("zoommil", "abmil"):
        widget.set_model(name)
        assert widget.model_spec == name
        assert not widget.patches_spin.isEnabled()
        assert widget.patches_spin.value() == 0  # "model default": no override is sent
        assert widget.magnify_panel.settings().n_patches is None


def test_zoommil_run_nests_three_layers_on_the_slide(zoom_setup, qtbot):
    viewer, widget, slide = zoom_setup
    cfg = ZOOMMIL_CONFIGS["zoommil"]
    mpp_x, mpp_y = slide.metadata["mpp"]
    assert (mpp_x, mpp_y) == pytest.approx((MPP, MPP))
    extent = slide_extent(slide)
    slide_data = slide.data
    run_and_wait(qtbot, widget, "zoommil")
    run = widget.last_runs[slide.metadata["path"]]
    assert run.result is not None and run.result.model_name == "zoommil"

    # three ROI layers, deeper above shallower, with the lineage nesting
    rois = ours(viewer, "rois")
    assert [lyr.name for lyr in rois] == [f"lesion · L{k} ROIs" for k in (1, 2, 3)]
    assert [layer_info(lyr)["layer"] for lyr in rois] == [1, 2, 3]
    idx = [viewer.layers.index(lyr) for lyr in rois]
    assert idx == sorted(idx)
    # K selected at each zoom step; the last step shows as many patches as were zoomed into
    assert [lyr.nshapes for lyr in rois] == [cfg.k[0], cfg.k[1], cfg.k[1]]
    assert list(rois[0].features["id"]) == [str(i + 1) for i in range(cfg.k[0])]
    boxes, depth = {}, {}
    for k, lyr in enumerate(rois, start=1):
        assert lyr.metadata["slide_path"] == slide.metadata["path"]
        assert layer_info(lyr)["committed"] is True
        assert list(lyr.text.values) == list(lyr.features["id"])
        # every ROI is one patch of its magnification: 64 px at 8, 4, 1 µm/px
        side = cfg.patch_size * cfg.mpps[k - 1]
        for rect, rid, parent in zip(lyr.data, lyr.features["id"], lyr.features["parent"]):
            rect = np.asarray(rect)
            assert np.ptp(rect, axis=0) == pytest.approx((side, side), rel=1e-6)
            assert inside(rect, extent), rid
            if k == 1:
                assert parent == "" and "." not in rid
            else:
                assert depth[parent] == k - 1 and rid.startswith(parent + ".")
                assert rid.rsplit(".", 1)[0] == parent
                assert inside(rect, boxes[parent]), (rid, parent)
            boxes[rid], depth[rid] = rect, k
    # lineage colours: a child has its root ancestor's hue, lighter
    l1_edges = {
        rid: np.asarray(c[:3]) for rid, c in zip(rois[0].features["id"], rois[0].edge_color)
    }
    for rid, c in zip(rois[2].features["id"], rois[2].edge_color):
        root = l1_edges[rid.split(".")[0]]
        assert (np.asarray(c[:3]) >= root - 1e-6).all() and np.asarray(c[:3]).sum() > root.sum()

    # attention: L1 one coarse map, L2/L3 one r×r map per selected parent; on the slide
    att = ours(viewer, "attention")
    assert [lyr.name for lyr in att] == [f"lesion · L{k} attention" for k in (1, 2, 3)]
    assert [layer_info(lyr)["maps"] for lyr in att] == [1, rois[0].nshapes, rois[1].nshapes]
    for k, lyr in enumerate(att, start=1):
        x0, y0, x1, y1 = lyr.metadata["box"]
        (r0, c0), (r1, c1) = lyr.extent.world
        half_r, half_c = np.asarray(lyr.scale) / 2
        world = (r0 - half_r, c0 - half_c, r1 + half_r, c1 + half_c)
        assert world == pytest.approx((y0 * mpp_y, x0 * mpp_x, y1 * mpp_y, x1 * mpp_x), abs=1e-6)
        assert inside(np.reshape(world, (2, 2)), extent, tol=1e-6), lyr.name
        # one map cell is one patch of the layer's magnification: an ROI of the same layer
        side = cfg.patch_size * cfg.mpps[k - 1]
        assert tuple(lyr.scale) == pytest.approx((side, side), rel=1e-6), lyr.name
        assert float(np.nanmax(lyr.data)) == pytest.approx(1.0)  # the most attended cell
        if k > 1:  # the maps cover exactly the parents zoomed into
            for rect in rois[k - 2].data:
                assert inside(rect, np.reshape(world, (2, 2))), lyr.name
    # every ROI outline above every overlay (layer 2's maps cover layer 1's boxes)
    order = [viewer.layers.index(lyr) for lyr in [*att, *rois]]
    assert order == sorted(order)
    assert len(ours(viewer, "coverage")) == 1

    # the result line
    text = widget.result_label.text()
    match = re.match(r"zoommil: p = (\d\.\d{3}) \(label ([01])\)", text)
    assert match, text
    assert float(match[1]) == pytest.approx(run.result.probability, abs=5e-4)
    assert 0.0 < run.result.probability < 1.0
    assert "px processed" in text and "tissue examined" in text
    assert widget.progress.value() == widget.progress.maximum() == 3

    # hovering the centre of a layer-3 ROI describes it (napari's own mouse-move dispatch)

    (annotations,) = ours(viewer, "annotations")
    viewer.layers.selection.active = annotations
    own_help = annotations.help
    for rect, rid in zip(rois[2].data, rois[2].features["id"]):
        hover(viewer, tuple(np.asarray(rect).mean(axis=0)))
        said = annotations.help
        assert said.startswith(f"ROI {rid} · layer 3 · attention mass "), said
        assert f"p = {run.result.probability:.2f}" in said
    hover(viewer, (-50.0, -50.0))
    assert annotations.help == own_help

    # a second Magnify replaces the first run's layers: no duplicates, all of the new run
    first_tag = run.tag
    run_and_wait(qtbot, widget, "zoommil")
    tag = widget.last_runs[slide.metadata["path"]].tag
    assert tag != first_tag
    names = [lyr.name for lyr in viewer.layers]
    assert len(names) == len(set(names)), names
    assert [len(ours(viewer, k)) for k in ("rois", "attention", "coverage")] == [3, 3, 1]
    assert all(
        layer_info(lyr)["run"] == tag
        for kind in ("rois", "attention", "coverage")
        for lyr in ours(viewer, kind)
    )
    assert [lyr.name for lyr in ours(viewer, "rois")] == [f"lesion · L{k} ROIs" for k in (1, 2, 3)]
    # the model is deterministic in evaluation: the same ROIs again
    assert [list(lyr.features["id"]) for lyr in ours(viewer, "rois")] == [
        list(lyr.features["id"]) for lyr in rois
    ]
    assert slide in viewer.layers and slide.data is slide_data

    # one screenshot at Home: the outlines of the topmost ROI layer are drawn in their
    # lineage colours
    img = home_screenshot(viewer, qtbot, save=SHOT)
    for rid, on, off in outline_contrast(viewer, img, ours(viewer, "rois")[2]):
        assert on >= 0.75 and off <= 0.25, (rid, on, off)


def test_cancel_during_a_zoommil_run_then_abmil_runs(zoom_setup, qtbot):
    from superqt.utils._qthreading import WorkerBase

    from napari_magnet._napari.run_controller import RunState

    viewer, widget, slide = zoom_setup
    before = [lyr.name for lyr in viewer.layers]
    slide_data = slide.data
    outcomes, shown = [], []
    widget.run_finished.connect(outcomes.append)
    widget.set_model("zoommil")
    widget.set_device("cpu")
    assert widget.run_magnify() is not None
    run = widget.current_run

    def cancel_on_first_step(n):
        if not run.cancelled:
            shown.append((n, len(ours(viewer, "rois"))))
            widget.cancel()

    widget.step_shown.connect(cancel_on_first_step)
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    widget.step_shown.disconnect(cancel_on_first_step)
    assert shown == [(1, 1)]  # cancelled with layer 1 on screen
    assert run.cancelled and outcomes == ["cancelled"]
    assert widget.state is RunState.IDLE
    assert widget.magnify_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert widget.model_combo.isEnabled()
    assert widget.result_label.text().startswith("Cancelled")
    qtbot.waitUntil(lambda: [lyr.name for lyr in viewer.layers] == before, timeout=10_000)
    assert slide in viewer.layers and slide.visible and slide.data is slide_data
    assert widget.slide_layer is slide
    qtbot.waitUntil(lambda: not WorkerBase._worker_set, timeout=30_000)

    # the widget is usable: abmil (one magnification, no zoom) runs on the same slide
    run_and_wait(qtbot, widget, "abmil")
    assert outcomes == ["cancelled", "committed"]
    (rois,) = ours(viewer, "rois")
    assert rois.name == "lesion · L1 ROIs" and layer_info(rois)["layer"] == 1
    assert rois.nshapes == LAST_STEP_PATCHES
    assert list(rois.features["id"]) == [str(i + 1) for i in range(LAST_STEP_PATCHES)]
    side = ZOOMMIL_CONFIGS["abmil"].patch_size * ZOOMMIL_CONFIGS["abmil"].mpps[0]
    extent = slide_extent(slide)
    for rect in rois.data:
        assert np.ptp(np.asarray(rect), axis=0) == pytest.approx((side, side), rel=1e-6)
        assert inside(rect, extent)
    (att,) = ours(viewer, "attention")
    assert layer_info(att)["maps"] == 1 and tuple(att.scale) == pytest.approx((side, side))
    assert widget.result_label.text().startswith("abmil: p = ")
    assert widget.progress.value() == widget.progress.maximum() == 1
    assert slide in viewer.layers and slide.data is slide_data


def test_zoommil_outlines_of_every_layer_show_over_the_attention(zoom_setup, qtbot):
    viewer, widget, slide = zoom_setup
    run_and_wait(qtbot, widget, "zoommil")
    rois = ours(viewer, "rois")
    assert len(rois) == 3
    img = home_screenshot(viewer, qtbot)
    # layer 1's outlines should show as layer 3's do (in places they lie under a child's)
    shown = [on for _, on, _ in outline_contrast(viewer, img, rois[0])]
    assert np.mean(shown) >= 0.6, shown
