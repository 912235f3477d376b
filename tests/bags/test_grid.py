"""Nested patch grids at target µm per pixel, on generated and real slides."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_magnet.bags import PatchOptions, TissueOptions, nested_grid, parse_mpps
from napari_magnet.bags.grid import plan_magnifications
from napari_magnet.bags.patching import make_bag
from napari_magnet.bags.pixels import area_weights, iter_patch_batches, read_patch
from napari_magnet.slide import open_slide


def _check_nesting(levels) -> None:
    """Every finer patch has one parent; a parent's r² children are contiguous, row-major,
    inside it and tile it."""
    first = levels[0]
    assert (first.parent == -1).all()
    order = first.grid[:, 1] * 10**6 + first.grid[:, 0]
    assert (np.diff(order) > 0).all(), "coarsest patches are row-major"
    for coarse, fine in zip(levels, levels[1:]):
        r = int(round(coarse.mpp / fine.mpp))
        assert len(fine) == len(coarse) * r * r
        assert fine.children_per_parent() == r * r
        np.testing.assert_array_equal(fine.parent, np.repeat(np.arange(len(coarse)), r * r))
        k = np.arange(len(fine)) % (r * r)
        expected = coarse.grid[fine.parent] * r + np.stack([k % r, k // r], axis=1)
        np.testing.assert_array_equal(fine.grid, expected)
        pb, cb = coarse.boxes()[fine.parent], fine.boxes()
        assert (cb[:, :2] >= pb[:, :2]).all()
        assert (cb[:, 2:] <= pb[:, 2:] + 1.0).all(), "inside the parent up to rounding"
        first_child = fine.coords[:: r * r]
        np.testing.assert_array_equal(first_child, coarse.coords)
        area = np.prod(fine.extent) * r * r
        assert area == pytest.approx(np.prod(coarse.extent), rel=1e-9)


def test_parse_mpps_accepts_nested_pixel_sizes_only():
    assert parse_mpps("8,4,1") == (8.0, 4.0, 1.0)
    assert parse_mpps([2, 1, 0.5]) == (2.0, 1.0, 0.5)
    assert parse_mpps("2") == (2.0,)
    for bad in ("8,3", "4,8", "4,4", "0,1", "a,b", "", "-2,-1", "nan"):
        with pytest.raises(ValueError):
            parse_mpps(bad)


def test_grids_on_a_synthetic_slide_are_nested(synthetic_slide):
    options = PatchOptions(mpps=(8, 4, 1), patch_size=32)
    with open_slide(synthetic_slide) as slide:
        bag, _ = make_bag(slide, options)
    levels = bag.levels
    assert [lv.name for lv in levels] == ["mpp_8", "mpp_4", "mpp_1"]
    assert 0 < len(levels[0]) < 8 * 6  # tissue-filtered, not the whole 8 x 6 grid
    _check_nesting(levels)
    # extents: patch_size pixels at the target pixel size, in level-0 pixels of 0.5 µm
    assert [lv.extent for lv in levels] == [(512.0, 512.0), (256.0, 256.0), (64.0, 64.0)]
    for lv in levels:
        np.testing.assert_array_equal(lv.coords, lv.grid * np.asarray(lv.extent, int))


def test_grids_without_a_mask_cover_the_slide(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        plans = plan_magnifications(slide.geometry, slide.mpp, (8, 2), 40)
        levels = nested_grid(plans, slide.dimensions)
    w, h = 4096, 3072
    extent = 40 * 8 / 0.5
    assert len(levels[0]) == math.ceil(w / extent) * math.ceil(h / extent)
    assert (levels[0].tissue == 1).all()
    _check_nesting(levels)
    # the overhanging last column and row still start inside the slide
    assert levels[0].coords[:, 0].max() < w and levels[0].coords[:, 1].max() < h


def test_non_integer_level0_sizes_round_consistently(cmu_path):
    """0.499 µm pixels: a 1 µm patch of 224 px covers 448.9 level-0 px; coordinates are
    rounded from the finest grid so parents and first children coincide exactly."""
    with open_slide(cmu_path) as slide:
        bag, _ = make_bag(slide, PatchOptions(mpps=(4, 2, 1), patch_size=56))
    assert bag.levels[-1].extent[0] == pytest.approx(56 * 1 / 0.499)
    _check_nesting(bag.levels)
    assert len(bag.levels[0]) > 0


def test_target_pixel_size_not_level_index(synthetic_slide, synthetic_40x):
    """The same µm per pixel covers the same tissue area on a 20x and a 40x scan, and each
    reads from the coarsest level with enough pixels."""
    for path in (synthetic_slide, synthetic_40x):
        with open_slide(path) as slide:
            plans = plan_magnifications(slide.geometry, slide.mpp, (8, 4, 1), 32)
            for plan in plans:
                assert plan.extent[0] * slide.mpp[0] == pytest.approx(32 * plan.mpp)
                scale = slide.geometry.level_scale(plan.patch_level)[0]
                assert plan.extent[0] / scale >= 32 - 1e-9  # enough pixels
                if plan.patch_level + 1 < slide.level_count:  # the next level has not
                    coarser = slide.geometry.level_scale(plan.patch_level + 1)[0]
                    assert plan.extent[0] / coarser < 32
    with open_slide(synthetic_40x) as slide:
        plans = plan_magnifications(slide.geometry, slide.mpp, (8, 4, 1), 32)
    assert [p.patch_level for p in plans] == [1, 1, 1]  # 1 µm = level 1 (downsample 4)


def test_float_downsamples_choose_levels_by_pixels(boxes_path):
    """boxes.tiff: downsamples 2, 4.016 and 8.086 — a patch 4x the slide's pixel size may not
    be read from the 4.016 level (7.97 px < 8), it comes from the 2x level."""
    with open_slide(boxes_path) as slide:
        m0 = slide.mpp[0]
        plans = plan_magnifications(slide.geometry, slide.mpp, (8 * m0, 4 * m0, m0), 8)
        assert [p.patch_level for p in plans] == [2, 1, 0]
        levels = nested_grid(plans, slide.dimensions)
        _check_nesting(levels)
        patch = read_patch(slide, levels[1], *levels[1].coords[3])
        assert patch.shape == (8, 8, 3) and patch.dtype == np.uint8


def test_upsampling_is_refused(cmu_path):
    with open_slide(cmu_path) as slide, pytest.raises(ValueError, match="finer than"):
        plan_magnifications(slide.geometry, slide.mpp, (1, 0.25), 32)


def test_area_weights_sum_to_one():
    w = area_weights(0.25, 7.75, 3, 8)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-6)


def test_read_patch_is_the_area_mean_of_level0(cmu_path):
    """At exactly 2 level-0 pixels per patch pixel, a patch is the 2x2 block mean."""
    with open_slide(cmu_path) as slide:
        plans = plan_magnifications(slide.geometry, slide.mpp, (2 * 0.499,), 16)
        (level,) = nested_grid(plans, slide.dimensions)
        x, y = level.coords[7]
        patch = read_patch(slide, level, x, y)
        region = slide.read_level(0, x, y, 32, 32).astype(float)
    block = region.reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))
    assert np.abs(patch - block).max() <= 1.0


def test_patches_resample_from_a_coarse_level(synthetic_slide):
    """A patch read from level 1 matches the same box read at level 0 and averaged."""
    with open_slide(synthetic_slide) as slide:
        plans = plan_magnifications(slide.geometry, slide.mpp, (8,), 32)
        (level,) = nested_grid(plans, slide.dimensions)
        assert level.patch_level == 1
        i = int(np.argmax(level.coords[:, 0] > 0))
        x, y = level.coords[i]
        patch = read_patch(slide, level, x, y).astype(float)
        fine = slide.read_level(0, x, y, 512, 512).astype(float)
    reference = fine.reshape(32, 16, 32, 16, 3).mean(axis=(1, 3))
    assert np.abs(patch - reference).mean() < 6.0  # two JPEG pyramid levels agree


def test_patch_batches_follow_the_bag_order(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        bag, _ = make_bag(
            slide, PatchOptions(mpps=(8, 4), patch_size=16, tissue=TissueOptions(min_fraction=0.5))
        )
        level = bag.levels[1]
        batches = list(iter_patch_batches(slide, level, batch_size=5))
        assert np.concatenate([b[0] for b in batches]).tolist() == list(range(len(level)))
        assert batches[0][1].shape == (5, 16, 16, 3)
        np.testing.assert_array_equal(batches[0][1][2], read_patch(slide, level, *level.coords[2]))
