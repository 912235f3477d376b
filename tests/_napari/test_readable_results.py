"""Results a pathologist can read, in a real viewer (Xvfb) over the CMU slide: visible
attention overlays with one colour bar, maps cut to the slide, ROI labels that never print over
each other, the hovered ROI described, drawing in the class colour, the coverage legend."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_magnet._napari.layers import (
    ATTENTION_CUT,
    add_roi_layer,
    layer_info,
    layer_kind,
    set_roi_probability,
)
from napari_magnet._napari.roi_display import LEGEND_PREFIX, describe_hovered_roi
from napari_magnet._napari.widget import demo_available
from napari_magnet.engine.types import MagnifyStep
from napari_magnet.io.colors import class_color
from napari_magnet.io.rois import RoiTable

from .helpers import RUN_TIMEOUT, hover, ours


def camera(viewer):
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def text_overlay(viewer):
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    return overlays["text"] if overlays is not None and "text" in overlays else viewer.text_overlay


def shot(viewer, qtbot):
    qtbot.wait(50)
    return viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)


def canvas_world(viewer, shape):
    """World row and column of each canvas row and column (pixel centres)."""
    rows, cols = shape
    center = np.asarray(camera(viewer).center)[-2:]
    zoom = camera(viewer).zoom
    wr = center[0] + (np.arange(rows) + 0.5 - rows / 2) / zoom
    wc = center[1] + (np.arange(cols) + 0.5 - cols / 2) / zoom
    return wr, wc


def canvas_values(viewer, layer, shape):
    """The layer's data value under each canvas pixel (NaN off the layer)."""
    wr, wc = canvas_world(viewer, shape)
    scale, translate = np.asarray(layer.scale), np.asarray(layer.translate)
    ir = np.round((wr - translate[0]) / scale[0]).astype(int)
    ic = np.round((wc - translate[1]) / scale[1]).astype(int)
    data = np.asarray(layer.data)
    out = np.full(shape, np.nan)
    okr, okc = (ir >= 0) & (ir < data.shape[0]), (ic >= 0) & (ic < data.shape[1])
    out[np.ix_(okr, okc)] = data[np.ix_(ir[okr], ic[okc])]
    return out


@pytest.fixture
def run_viewer(setup, qtbot):
    """The CMU slide after a real Magnify run: the shipped demo model (a trained
    magnet3-lite, whose attention is as peaked as a real model's), else magnet3-lite."""
    viewer, widget, slide = setup
    widget.set_model("demo" if demo_available() else "magnet3-lite")
    widget.set_device("cpu")
    assert widget.run_magnify() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    qtbot.waitUntil(lambda: bool(ours(viewer, "coverage")), timeout=10_000)
    viewer.reset_view()
    return viewer, widget, slide


def test_after_a_run_attention_is_visible_cut_to_the_slide_and_explained(run_viewer, qtbot):
    """Attention overlays change ≥ 5 % of the slide on screen (the deepest layer; git HEAD's
    changed 0.1–0.3 % of the canvas each) and leave the tissue the model ignored untouched;
    one colour bar; the coverage legend; hovering an ROI describes it."""
    viewer, _, slide = run_viewer
    att = ours(viewer, "attention")
    assert len(att) == 3
    width, height = slide.metadata["slide"].dimensions
    mpp_x, mpp_y = slide.metadata["mpp"]
    for lyr in att:
        # cut exactly to the slide: pixel edges, not only centres, stay on it
        x0, y0, x1, y1 = lyr.metadata["box"]
        assert x0 >= 0 and y0 >= 0 and x1 <= width + 1e-6 and y1 <= height + 1e-6
        (r0, c0), (r1, c1) = lyr.extent.world
        half_r, half_c = np.asarray(lyr.scale) / 2
        assert r0 - half_r >= -1e-6 and c1 + half_c <= width * mpp_x + 1e-6
        assert r1 + half_r <= height * mpp_y + 1e-6 and c0 - half_c >= -1e-6
        assert tuple(lyr.contrast_limits) == (0.0, 1.0)
    # one colour bar, the topmost visible attention layer's
    assert [lyr.colorbar.visible for lyr in att] == [False, False, True]
    att[2].visible = False
    assert [lyr.colorbar.visible for lyr in att] == [False, True, False]
    att[2].visible = True

    others = [lyr for lyr in viewer.layers if lyr is not slide]
    for lyr in others:
        lyr.visible = False
    base = shot(viewer, qtbot)
    wr, wc = canvas_world(viewer, base.shape[:2])
    on_slide = np.outer((wr >= 0) & (wr <= height * mpp_y), (wc >= 0) & (wc <= width * mpp_x))
    fractions = []
    for lyr in att:
        lyr.visible = True
        lyr.colorbar.visible = False  # the map alone
        img = shot(viewer, qtbot)
        lyr.visible = False
        changed = np.abs(img - base).max(axis=-1) > 20
        fractions.append(changed[on_slide].mean())
        values = np.nan_to_num(canvas_values(viewer, lyr, changed.shape), nan=0.0)
        # the tissue the model ignored is left exactly as it is (cell edges aside)
        ignored = ndimage.binary_erosion(values < ATTENTION_CUT, iterations=2)
        assert np.abs(img - base).max(axis=-1)[ignored].max() <= 2, lyr.name
        # and the cells that carry the attention stand out
        core = ndimage.binary_erosion(values >= 0.5, iterations=2)
        if core.any():
            assert changed[core].mean() > 0.95, lyr.name
    assert fractions[-1] > 0.05, fractions
    assert min(fractions) > 0.004, fractions
    for lyr in viewer.layers:
        lyr.visible = layer_kind(lyr) != "coverage"

    (cov,) = ours(viewer, "coverage")
    assert not cov.visible and not text_overlay(viewer).visible
    cov.visible = True
    legend = text_overlay(viewer).text
    assert text_overlay(viewer).visible and legend.startswith(LEGEND_PREFIX)
    assert "L1 blue" in legend and "L3 yellow" in legend and "never examined" in legend
    cov.visible = False
    assert not text_overlay(viewer).visible
    # hovering the centre of a layer-3 ROI names it, whichever layer is active
    rois = ours(viewer, "rois")
    assert [layer_info(lyr)["layer"] for lyr in rois] == [1, 2, 3]
    viewer.layers.selection.active = slide
    own_help = slide.help
    rect = np.asarray(rois[2].data[0])
    text = describe_hovered_roi(viewer, rect.mean(axis=0))
    assert text is not None and text.startswith("ROI ") and "layer 3" in text
    assert "attention mass" in text and "pyramid level" in text
    # the live run's result reaches its ROIs: hovering shows the slide probability too
    assert " · p = " in text
    assert slide.help == text
    describe_hovered_roi(viewer, (-1e6, -1e6))
    assert slide.help == own_help


def _step(layer, ids, parents, boxes, mass):
    n = len(ids)
    return MagnifyStep(
        layer=layer,
        region_ids=ids,
        parent_ids=parents,
        boxes=np.array(boxes, dtype=float),
        levels=np.zeros(n),
        attention_maps=[],
        attention_boxes=np.zeros((0, 4)),
        attention_mass=np.array(mass, dtype=float),
        aux_probability=0.61 if layer == 3 else None,
    )


def test_roi_labels_do_not_pile_up_and_hover_describes_the_roi(setup, qtbot):
    viewer, _, slide = setup
    mpp = slide.metadata["mpp"]
    steps = [
        _step(1, ["1"], [""], [[400, 1400, 1100, 2100]], [0.4]),
        # the frozen patch 1.1 has its parent's box; 1.2 is 32 × 35 px
        _step(
            2,
            ["1.1", "1.2"],
            ["1", "1"],
            [[400, 1400, 1100, 2100], [470, 1990, 502, 2025]],
            [0.3, 0.2],
        ),
        # 1.2.1 is 2 × 2 px; 1.2.2 and 1.2.3 nearly share a corner
        _step(
            3,
            ["1.2.1", "1.2.2", "1.2.3"],
            ["1.2"] * 3,
            [[498, 2020, 500, 2022], [475, 1995, 490, 2010], [476, 1996, 491, 2011]],
            [0.05, 0.1, 0.12],
        ),
    ]
    layers = []
    for step in steps:
        data = RoiTable.from_steps([step], probability=0.51).to_layer_data(mpp)
        layers.append(add_roi_layer(viewer, slide, data.rects, data.features, step.layer, "t"))
    viewer.reset_view()

    def shown(layer):
        return (np.asarray(layer.text.color.array)[:, 3] > 0).tolist()

    # each layer labels another corner, smaller with depth; the labels are the ids
    assert len({str(lyr.text.anchor) for lyr in layers}) == 3
    sizes = [lyr.text.size for lyr in layers]
    assert sizes == sorted(sizes, reverse=True)
    assert [list(lyr.text.values) for lyr in layers] == [
        ["1"],
        ["1.1", "1.2"],
        ["1.2.1", "1.2.2", "1.2.3"],
    ]
    # the whole slide in view: L1's label and its frozen child's both show, the small ROIs'
    # labels are hidden
    assert shown(layers[0]) == [True] and shown(layers[1]) == [True, False]
    assert shown(layers[2]) == [False, False, False]
    # the 2 × 2 px ROI is a hairline, not a blob
    widths = layers[2].edge_width
    assert widths[0] <= 0.15 * 2 * mpp[0] + 1e-4 and widths[1] > widths[0]
    # zoomed on ROI 1.2: its label and one of the two siblings' (not both: they would
    # print over each other); the 2 × 2 px ROI stays unlabelled
    camera(viewer).center = (2008 * mpp[1], 486 * mpp[0])
    camera(viewer).zoom = 8.0
    assert shown(layers[1]) == [True, True]
    assert shown(layers[2]) == [False, True, False]
    camera(viewer).zoom = 400.0
    camera(viewer).center = (2021 * mpp[1], 499 * mpp[0])
    assert shown(layers[2])[0] is True
    # hidden layers do not take the room of visible ones
    camera(viewer).center = (2008 * mpp[1], 486 * mpp[0])
    camera(viewer).zoom = 8.0
    layers[2].visible = False
    layers[1].visible = False
    layers[1].visible = True
    assert shown(layers[1]) == [True, True]

    # hover: through napari's own mouse-move dispatch, with the Annotations layer active

    layers[2].visible = True
    (annotations,) = ours(viewer, "annotations")
    viewer.layers.selection.active = annotations
    own_help = annotations.help
    hover(viewer, (2003 * mpp[1], 483 * mpp[0]))
    assert annotations.help == (
        "ROI 1.2.3 · layer 3 · attention mass 0.12 · pyramid level 0 · p = 0.51 · aux p = 0.61"
    )
    hover(viewer, (1500 * mpp[1], 1000 * mpp[0]))
    assert annotations.help.startswith("ROI 1.1 · layer 2")
    hover(viewer, (10.0, 10.0))
    assert annotations.help == own_help
    # the run's probability, once its result is in, shows too; the labels stay laid out
    before = shown(layers[2])
    set_roi_probability(layers[2], 0.77)
    assert "p = 0.77" in describe_hovered_roi(viewer, (2003 * mpp[1], 483 * mpp[0]))
    assert shown(layers[2]) == before


def test_drawn_shapes_take_their_class_colour(setup, qtbot):
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    viewer, _, _ = setup
    (layer,) = ours(viewer, "annotations")
    tumor = np.array(class_color("Tumor")) / 255.0
    assert layer.feature_defaults["class"].iloc[0] == "Tumor"

    class Click:
        def __init__(self, position, kind):
            self.position = position
            self.type = kind
            self.is_dragging = False
            self.modifiers = []
            self.handled = False
            self.pos = np.array([0, 0])
            self.view_direction = None
            self.dims_displayed = [0, 1]
            self.button = 1

    layer.mode = "add_polygon"
    for point in [(500.0, 500.0), (600.0, 500.0), (600.0, 700.0)]:
        mouse_press_callbacks(layer, Click(point, "mouse_press"))
        mouse_release_callbacks(layer, Click(point, "mouse_release"))
    # while the polygon is being drawn: the class colour, a light fill — no opaque white
    face = np.asarray(layer.face_color)[-1]
    edge = np.asarray(layer.edge_color)[-1]
    np.testing.assert_allclose(edge[:3], tumor, atol=1e-6)
    assert face[3] <= 0.2 and not np.allclose(face, [1, 1, 1, 1])
    layer.mode = "select"
    np.testing.assert_allclose(np.asarray(layer.edge_color)[-1][:3], tumor, atol=1e-6)
    # another class for the next shapes: the drawing colours follow
    layer.selected_data = set()
    layer.feature_defaults = {"class": "Normal", "review": "unreviewed", "name": ""}
    layer.mode = "add_rectangle"
    normal = np.array(class_color("Normal")) / 255.0
    mouse_press_callbacks(layer, Click((100.0, 100.0), "mouse_press"))
    np.testing.assert_allclose(np.asarray(layer.edge_color)[-1][:3], normal, atol=1e-6)
    assert np.asarray(layer.face_color)[-1][3] <= 0.2
