"""Attention sampling reads its patches where the attention points, on a generated slide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_magnet import load_model, magnify, open_slide
from napari_magnet.synth import SyntheticSlideSpec, generate_slide


def slide_with_attention_on_its_lesion(path):
    """A generated slide with a macro lesion, and an attention function (what the attention
    network would output) that is uniform on that lesion's box and 0 elsewhere."""
    info = generate_slide(
        path,
        SyntheticSlideSpec(width=8192, height=6144, mpp=1.0, seed=4, label=1, lesion_kind="macro"),
    )
    lesion = max(
        info.tumour_lesions, key=lambda les: (les.box[2] - les.box[0]) * (les.box[3] - les.box[1])
    )
    x0, y0, x1, y1 = lesion.box
    side = float(max(info.width, info.height))
    frame_x0 = info.width / 2 - side / 2
    frame_y0 = info.height / 2 - side / 2

    def peaked_on_lesion(view: torch.Tensor) -> torch.Tensor:
        b, _, h, w = view.shape
        xs = frame_x0 + (torch.arange(w) + 0.5) / w * side
        ys = frame_y0 + (torch.arange(h) + 0.5) / h * side
        inside = ((ys > y0) & (ys < y1))[:, None] & ((xs > x0) & (xs < x1))[None]
        attention = inside.float().expand(b, h, w)
        return attention / attention.sum(dim=(-2, -1), keepdim=True)

    return info, lesion.box, peaked_on_lesion


def test_a_hand_set_attention_peak_on_a_lesion_yields_patches_on_that_lesion(tmp_path):
    info, (x0, y0, x1, y1), peaked_on_lesion = slide_with_attention_on_its_lesion(
        tmp_path / "one.tif"
    )
    model = load_model("ats", device="cpu")
    model.attention = peaked_on_lesion  # the attention network's output, set by hand
    with open_slide(info.path) as slide:
        step, result = list(magnify(slide, model, device="cpu"))
    centres = (step.boxes[:, :2] + step.boxes[:, 2:]) / 2
    assert len(centres) == model.config.n_patches
    assert ((centres[:, 0] > x0) & (centres[:, 0] < x1)).all()
    assert ((centres[:, 1] > y0) & (centres[:, 1] < y1)).all()
    # Drawn without replacement: twenty distinct positions.
    assert len({tuple(np.round(c, 3)) for c in centres}) == len(centres)
    assert result.pixels_processed == (256 * 256 + 20 * 50 * 50) * 3


def test_two_level_draws_regions_on_the_peak_then_patches_inside_each_region(tmp_path):
    info, (x0, y0, x1, y1), peaked_on_lesion = slide_with_attention_on_its_lesion(
        tmp_path / "two.tif"
    )
    model = load_model("ats-2level", device="cpu")
    cfg = model.config
    model.attention = peaked_on_lesion
    with open_slide(info.path) as slide:
        regions, patches, result = list(magnify(slide, model, device="cpu", keep_patches=True))
    n1, n2 = cfg.n_regions, cfg.n_patches
    assert (regions.layer, patches.layer) == (1, 2)
    assert regions.region_ids == [str(i) for i in range(1, n1 + 1)]
    assert patches.region_ids == [f"{i}.{j}" for i in range(1, n1 + 1) for j in range(1, n2 + 1)]
    assert patches.parent_ids == [str(i) for i in range(1, n1 + 1) for _ in range(n2)]
    region_centres = (regions.boxes[:, :2] + regions.boxes[:, 2:]) / 2
    assert ((region_centres[:, 0] > x0) & (region_centres[:, 0] < x1)).all()
    assert ((region_centres[:, 1] > y0) & (region_centres[:, 1] < y1)).all()
    np.testing.assert_allclose(regions.boxes[:, 2] - regions.boxes[:, 0], cfg.region_side)
    # one attention map per region, over that region's box, each a distribution
    assert len(patches.attention_maps) == n1
    np.testing.assert_allclose(patches.attention_boxes, regions.boxes)
    for m in patches.attention_maps:
        assert m.shape == (cfg.region_size, cfg.region_size)
        assert m.sum() == pytest.approx(1.0, abs=1e-5)
    # every patch is centred inside its parent region (a patch on the region's edge may reach
    # half a patch beyond it), and is read from a finer level
    parents = regions.boxes[np.repeat(np.arange(n1), n2)]
    centres = (patches.boxes[:, :2] + patches.boxes[:, 2:]) / 2
    assert ((centres > parents[:, :2]) & (centres < parents[:, 2:])).all()
    np.testing.assert_allclose(patches.boxes[:, 2:] - patches.boxes[:, :2], cfg.patch_side)
    assert patches.levels.max() <= regions.levels.min()
    assert regions.patches.shape == (n1, cfg.region_size, cfg.region_size, 3)
    assert patches.patches.shape == (n1 * n2, cfg.patch_size, cfg.patch_size, 3)
    assert result.pixels_processed == (256 * 256 + n1 * 64 * 64 + n1 * n2 * 50 * 50) * 3
    assert 0.0 <= result.probability <= 1.0 and result.model_name == "ats-2level"
