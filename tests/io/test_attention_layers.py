"""Attention maps placed on the slide: mass rank, exact cut to the slide, composites."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from napari_magnet.io.attention_layers import (
    attention_box_from_layer,
    attention_layer_data,
    attention_mass_rank,
    clip_to_slide,
    composite_attention,
    is_mass_rank,
)

from .samples import MPP


def test_mass_rank_is_the_share_of_attention_at_or_below_each_cell():
    amap = np.array([[0.0, 0.0, 1.0], [2.0, 3.0, 4.0]])  # mean 10 / 6
    # cells at or below the uniform share (the mean) are not where the model looked: 0
    np.testing.assert_allclose(attention_mass_rank(amap), [[0, 0, 0], [0.3, 0.6, 1.0]], 1e-6)
    # ties share their rank; the scale of the map does not matter
    np.testing.assert_allclose(attention_mass_rank([1.0, 2.0, 2.0, 0.0]), [0, 1.0, 1.0, 0])
    np.testing.assert_allclose(attention_mass_rank([1.0, 3.0, 3.0, 4.0]), [0, 7 / 11, 7 / 11, 1])
    np.testing.assert_allclose(attention_mass_rank(amap * 1e-4), attention_mass_rank(amap), 1e-6)
    # a uniform map, or one without attention: the model looked nowhere in particular
    assert (attention_mass_rank(np.full((3, 3), 0.2)) == 0).all()
    assert (attention_mass_rank(np.zeros((3, 3))) == 0).all()
    # a near-uniform map (an untrained model's) shows its above-average half only
    noisy = np.random.default_rng(1).uniform(0.9, 1.1, (56, 56))
    assert 0.4 < (attention_mass_rank(noisy) > 0).mean() < 0.6
    # NaN carries no attention; negative maps are shifted to start at 0
    np.testing.assert_allclose(attention_mass_rank([np.nan, 1.0, 3.0, 0.0]), [0, 0, 1.0, 0])
    np.testing.assert_allclose(attention_mass_rank([-1.0, 0.0, 1.0]), [0, 0, 1])
    assert attention_mass_rank(amap).dtype == np.float32


def test_a_peaked_map_shows_the_cells_that_carry_its_mass():
    """An entmax-like map (as the demo model's layer 1 on the CMU slide): 44 cells of 3136
    hold all the attention, the top one 25 %, with a long tail. A min-max stretch puts only
    a handful of cells above half the top colour; the mass rank puts every cell of the
    smallest set holding 90 % of the attention above 0.1, and leaves the others at 0 or
    below 0.1."""
    rng = np.random.default_rng(0)
    amap = np.zeros((56, 56))
    cells = rng.choice(56 * 56, 44, replace=False)
    amap.flat[cells] = 0.8 ** np.arange(44)
    amap /= amap.sum()
    linear = (amap - amap.min()) / (amap.max() - amap.min())
    assert (linear > 0.5).sum() <= 4
    rank = attention_mass_rank(amap)
    order = np.argsort(amap, axis=None)[::-1]
    core = order[: np.searchsorted(np.cumsum(amap.flat[order]), 0.9) + 1]
    assert (rank.flat[core] > 0.1).all() and len(core) >= 10
    assert (rank[amap == 0] == 0).all() and rank.flat[order[0]] == 1.0
    assert (rank > 0.1).sum() == len(core)


def test_mass_rank_rasters_are_kept_as_they_are():
    amap = np.array([[0.0, 1.0], [2.0, 5.0]])
    placed = attention_layer_data(amap, (0, 0, 20, 20), MPP)
    assert is_mass_rank(placed.data) and placed.contrast_limits == (0.0, 1.0)
    # a layer written to a file and read back shows the same values
    again = attention_layer_data(placed.data, placed.box, MPP)
    np.testing.assert_array_equal(again.data, placed.data)
    assert not is_mass_rank(amap) and not is_mass_rank(np.zeros((2, 2)))


def test_attention_placement_centres_pixels_and_cuts_exactly_to_slide():
    amap = np.arange(16, dtype=float).reshape(4, 4)
    placed = attention_layer_data(amap, (-20, 0, 20, 40), MPP, slide_dims=(30, 40))
    # map pixels are 10 x 10 level-0 px; the two columns left of the slide (black padding)
    # are dropped — after the mass rank is taken over the whole map
    assert placed.data.shape == (4, 2)
    np.testing.assert_array_equal(placed.data, attention_mass_rank(amap)[:, 2:])
    assert placed.box == pytest.approx((0, 0, 20, 40))
    assert placed.scale == pytest.approx((10 * 0.25, 10 * 0.5))
    # translate: the top-left kept pixel's centre (x = 5, y = 5) in µm, not its corner
    assert placed.translate == pytest.approx((5 * 0.25, 5 * 0.5))
    assert placed.contrast_limits == (0.0, 1.0)
    back = attention_box_from_layer(placed.data.shape, placed.scale, placed.translate, MPP)
    assert back == pytest.approx(placed.box)
    raw = attention_layer_data(amap, (-20, 0, 20, 40), MPP, (30, 40), mass_rank=False)
    np.testing.assert_array_equal(raw.data, amap[:, 2:])
    assert raw.contrast_limits == pytest.approx((2.0, 15.0))


def test_cells_straddling_the_slide_edge_are_cut_at_the_edge():
    amap = np.arange(16, dtype=float).reshape(4, 4)
    # cell edges x = -14, -4, 6, 16, 26 and y = -6, 4, 14, 24, 34 on a 30 x 40 slide
    data, box = clip_to_slide(amap, (-14, -6, 26, 34), (30, 40))
    assert box == (0.0, 0.0, 26.0, 34.0)
    np.testing.assert_array_equal(data, amap[1:4, 1:4])
    # a map on the slide, or one off it, is left alone
    same, same_box = clip_to_slide(amap, (0, 0, 20, 20), (30, 40))
    assert same is amap and same_box == (0, 0, 20, 20)


def test_a_square_frame_around_a_portrait_slide_is_cut_to_the_slide():
    """The CMU slide (2220 × 2967) in layer 1's square frame: 7 of 56 columns each side lie
    on the black padding, and some carry attention there."""
    amap = np.ones((56, 56))
    amap[:, :7] = 50.0  # attention on the padding
    placed = attention_layer_data(amap, (-373.5, 0, 2593.5, 2967), (0.499, 0.499), (2220, 2967))
    assert placed.box == pytest.approx((0, 0, 2220, 2967))
    assert placed.data.shape == (56, 42)
    # the padding's attention is not shown, but it counts in the mass
    assert placed.data.max() < 1.0
    # pixel edges on the slide's: the first column's left edge at 0, the last's right at W
    c0 = placed.translate[1] - placed.scale[1] / 2
    c1 = placed.translate[1] + placed.scale[1] * (placed.data.shape[1] - 0.5)
    assert c0 == pytest.approx(0) and c1 == pytest.approx(2220 * 0.499)


def test_composite_of_maps_is_cut_to_the_slide_and_keeps_each_maps_mass():
    a = np.zeros((4, 4))
    a[0, 0] = 1.0  # all of map a's attention in one cell
    b = np.arange(16, dtype=float).reshape(4, 4)
    boxes = np.array([[0, 0, 40, 40], [20, 20, 60, 60]])  # b reaches 10 px past the slide
    placed = composite_attention([a, b], boxes, MPP, slide_dims=(50, 50))
    assert placed.box == pytest.approx((0, 0, 50, 50))
    assert placed.contrast_limits == (0.0, 1.0) and placed.data.max() == 1.0
    # map a's top cell (level-0 x, y in 0..10) is at full strength, its empty cells at 0
    gy, gx = (np.array(placed.scale) / np.array([MPP[1], MPP[0]])).tolist()
    assert placed.data[int(5 / gy), int(5 / gx)] == 1.0
    assert placed.data[int(15 / gy), int(15 / gx)] == 0.0
    # where b lies, its rank (b's top cell, x, y in 50..60, is past the slide and cut)
    rank_b = attention_mass_rank(b)
    assert placed.data[int(45 / gy), int(45 / gx)] == pytest.approx(rank_b[2, 2])


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


@given(
    st.integers(2, 40),
    st.integers(2, 40),
    st.tuples(st.floats(-300, 300), st.floats(-300, 300), st.floats(5, 900), st.floats(5, 900)),
)
@settings(max_examples=60, deadline=None)
def test_a_cut_map_never_reaches_past_the_slide(h, w, box):
    x0, y0, bw, bh = box
    dims = (400, 300)
    if x0 + bw <= 0 or y0 + bh <= 0 or x0 >= dims[0] or y0 >= dims[1]:
        return
    placed = attention_layer_data(np.ones((h, w)), (x0, y0, x0 + bw, y0 + bh), MPP, dims)
    bx0, by0, bx1, by1 = placed.box
    assert bx0 >= 0 and by0 >= 0 and bx1 <= dims[0] + 1e-9 and by1 <= dims[1] + 1e-9
    back = attention_box_from_layer(placed.data.shape, placed.scale, placed.translate, MPP)
    assert back == pytest.approx(placed.box, abs=1e-6)
