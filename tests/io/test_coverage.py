"""Tissue masks and the coverage grid."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet.io.coverage import (
    UNEXAMINED,
    coverage_map,
    coverage_placement,
    coverage_summary,
    resize_mask,
    tissue_mask,
)

from .samples import MPP, step


def test_tissue_mask_excludes_glass_black_and_grey():
    rgb = np.array([[[250, 250, 250], [0, 0, 0], [128, 128, 128], [200, 100, 180]]], dtype=np.uint8)
    assert tissue_mask(rgb).tolist() == [[False, False, False, True]]


def test_resize_mask_area_threshold():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    assert resize_mask(mask, (2, 2)).tolist() == [[True, False], [False, False]]
    up = resize_mask(mask, (16, 16))
    assert up.shape == (16, 16) and up[:8, :8].all() and not up[8:, 8:].any()


def test_coverage_map_deepest_layer_and_unexamined_tissue():
    steps = [
        step(1, [[0, 0, 50, 100]], ["1"]),
        step(2, [[0, 0, 25, 50]], ["1.1"], ["1"]),
        step(3, [[1, 1, 2, 2]], ["1.1.1"], ["1.1"]),
    ]  # smaller than a cell
    tissue = np.ones((10, 10), bool)
    tissue[:, 9] = False  # a glass column
    cov = coverage_map(steps, (100, 100), tissue)
    assert cov.shape == (10, 10) and cov.dtype == np.uint8
    assert cov[0, 0] == 3  # the tiny layer-3 region marks its cell
    assert cov[2, 1] == 2
    assert cov[8, 3] == 1
    assert cov[5, 7] == UNEXAMINED
    assert (cov[:, 9] == 0).all()
    summary = coverage_summary(cov)
    assert summary["unexamined"] == pytest.approx(40 / 90)
    assert summary["examined"] == pytest.approx(50 / 90)
    scale, translate = coverage_placement((100, 100), cov.shape, MPP)
    assert scale == pytest.approx((2.5, 5.0)) and translate == pytest.approx((1.25, 2.5))


def test_coverage_without_tissue_mask_covers_every_cell():
    cov = coverage_map([step(1, [[0, 0, 100, 100]], ["1"])], (100, 100), None, (4, 4))
    assert (cov == 1).all()


def test_coverage_colours_and_legend_name_each_layer():
    from napari_magnet.io.coverage import coverage_colors, coverage_legend

    colors = coverage_colors(3)
    assert set(colors) == {0, 1, 2, 3, UNEXAMINED} and colors[0][3] == 0
    assert len({colors[k] for k in (1, 2, 3, UNEXAMINED)}) == 4
    legend = coverage_legend(3)
    assert legend.startswith("Coverage —")
    for part in ("L1 blue", "L2 green", "L3 yellow", "red: tissue never examined"):
        assert part in legend
    assert "L4 yellow" in coverage_legend(4) and "L2 teal" in coverage_legend(4)
    assert len(coverage_colors(7)) == 9  # beyond the palette: blends
