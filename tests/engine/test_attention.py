"""Attention sampling reads its patches where the attention points, on a generated slide."""

from __future__ import annotations

import numpy as np
import torch

from napari_magnet import load_model, magnify, open_slide
from napari_magnet.slide.synthetic import SyntheticSlideSpec, generate_slide


def test_a_hand_set_attention_peak_on_a_lesion_yields_patches_on_that_lesion(tmp_path):
    info = generate_slide(tmp_path / "one.tif", SyntheticSlideSpec(
        width=8192, height=6144, mpp=1.0, seed=4, label=1, lesion_kind="macro"))
    lesion = max(info.tumour_lesions,
                 key=lambda les: (les.box[2] - les.box[0]) * (les.box[3] - les.box[1]))
    x0, y0, x1, y1 = lesion.box
    model = load_model("ats", device="cpu")
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
