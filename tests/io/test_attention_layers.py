"""Attention maps placed on the slide."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_magnet.io.attention_layers import attention_box_from_layer, attention_layer_data

from .samples import MPP


def test_attention_placement_centres_pixels_and_crops_to_slide():
    amap = np.arange(16, dtype=float).reshape(4, 4)
    placed = attention_layer_data(amap, (-20, 0, 20, 40), MPP, slide_dims=(30, 40))
    # map pixels are 10 x 10 level-0 px; columns centred at x = -15, -5, 5, 15: the two
    # centred left of the slide (black padding) are dropped
    assert placed.data.shape == (4, 2)
    np.testing.assert_array_equal(placed.data, amap[:, 2:])
    assert placed.box == pytest.approx((0, 0, 20, 40))
    assert placed.scale == pytest.approx((10 * 0.25, 10 * 0.5))
    # translate: the top-left kept pixel's centre (x = 5, y = 5) in µm, not its corner
    assert placed.translate == pytest.approx((5 * 0.25, 5 * 0.5))
    assert placed.contrast_limits == pytest.approx((2.0, 15.0))
    back = attention_box_from_layer(placed.data.shape, placed.scale, placed.translate, MPP)
    assert back == pytest.approx(placed.box)


@given(
    st.integers(1, 64),
    st.integers(1, 64),
    st.tuples(st.floats(-500, 500), st.floats(-500, 500), st.floats(1, 800), st.floats(1, 800)),
)
@settings(max_examples=60, deadline=None)
def test_attention_placement_inverts(h, w, box):
    x0, y0, bw, bh = box
    placed = attention_layer_data(np.ones((h, w)), (x0, y0, x0 + bw, y0 + bh), MPP)
    back = attention_box_from_layer((h, w), placed.scale, placed.translate, MPP)
    assert back == pytest.approx((x0, y0, x0 + bw, y0 + bh), abs=1e-6)
