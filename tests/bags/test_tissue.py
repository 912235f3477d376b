"""The tissue mask from a low-resolution level, box fractions, and tissue filtering."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet.bags import PatchOptions, TissueMask, TissueOptions, slide_tissue_mask
from napari_magnet.bags.patching import make_bag
from napari_magnet.bags.pixels import read_patch
from napari_magnet.bags.tissue import _block_mean
from napari_magnet.io.coverage import tissue_mask
from napari_magnet.slide import open_slide


def test_options_are_checked():
    for bad in ({"white": 300}, {"black": -1}, {"min_fraction": 1.5}, {"mask_side": 10}):
        with pytest.raises(ValueError):
            TissueOptions(**bad)
    assert TissueOptions().config()["min_fraction"] == 0.05


def test_mask_is_the_project_rule_on_the_smallest_large_enough_level(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        mask = slide_tissue_mask(slide, TissueOptions(mask_side=1024))
        assert mask.level == 1  # 1024 x 768: the smallest level with a side >= 1024
        level = slide.read_level(1, 0, 0, 1024, 768)
    np.testing.assert_array_equal(mask.mask, tissue_mask(level))
    assert mask.scale == (4.0, 4.0)
    assert 0.1 < mask.fraction < 0.9  # tissue pieces on glass


def test_thresholds_change_the_mask(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        strict = slide_tissue_mask(slide, TissueOptions(white=120))
        loose = slide_tissue_mask(slide, TissueOptions(white=250))
    assert strict.fraction < loose.fraction
    assert not (strict.mask & ~loose.mask).any()


def test_strips_and_block_means_equal_one_read(cmu_path):
    """CMU has one 2220 x 2967 level: a 64-px mask is built from several strips, averaged
    in 46 x 46 blocks, exactly as from one read of the whole level."""
    options = TissueOptions(mask_side=64)
    with open_slide(cmu_path) as slide:
        mask = slide_tissue_mask(slide, options)
        whole = slide.read_level(0, 0, 0, 2220, 2967)
    expected = tissue_mask(_block_mean(whole, 46))
    np.testing.assert_array_equal(mask.mask, expected)
    assert mask.mask.shape == (65, 49)
    assert 0.1 < mask.fraction < 0.9


def test_box_fractions_count_outside_as_glass():
    grid = np.zeros((4, 4), dtype=bool)
    grid[:2, :2] = True  # top-left quarter is tissue
    mask = TissueMask(grid, (10.0, 10.0), 0)
    xy = np.array([[0, 0], [0, 0], [20, 20], [10, 10], [30, 30]])
    got = mask.fractions(xy[:1], (20, 20))
    assert got.tolist() == [1.0]
    np.testing.assert_allclose(mask.fractions(xy[1:2], (40, 40)), [0.25])
    np.testing.assert_allclose(mask.fractions(xy[2:3], (20, 20)), [0.0])
    np.testing.assert_allclose(mask.fractions(xy[3:4], (20, 20)), [0.25])
    # a box half past the slide's edge: the part outside is glass
    np.testing.assert_allclose(mask.fractions(np.array([[-20, 0]]), (40, 20)), [0.5])
    assert mask.mask.flags.writeable is False


def test_only_the_coarsest_magnification_is_filtered(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        loose, _ = make_bag(slide, PatchOptions((8, 2), 16, TissueOptions(min_fraction=0.0)))
        strict, _ = make_bag(slide, PatchOptions((8, 2), 16, TissueOptions(min_fraction=0.6)))
        coarse, fine = strict.levels
        assert (coarse.tissue >= 0.6).all()
        assert (loose.levels[0].tissue > 0).all()
        assert len(coarse) < len(loose.levels[0]) < 16 * 12  # of a 16 x 12 grid
        kept = {tuple(g) for g in coarse.grid}
        dropped = [i for i, g in enumerate(loose.levels[0].grid) if tuple(g) not in kept]
        assert kept <= {tuple(g) for g in loose.levels[0].grid}
        assert (loose.levels[0].tissue[dropped] < 0.6).all()
        # children on glass are kept (a fixed 4 x 4 per parent) and marked by their fraction
        assert len(fine) == 16 * len(coarse)
        per_parent = fine.tissue.reshape(len(coarse), 16).mean(axis=1)
        np.testing.assert_allclose(per_parent, coarse.tissue, atol=0.05)
        # kept coarse patches look like tissue, dropped ones like glass
        level = loose.levels[0]
        means = np.array([read_patch(slide, level, *xy).mean() for xy in level.coords])
    kept_rows = [i for i in range(len(level)) if i not in set(dropped)]
    assert means[kept_rows].mean() < means[dropped].mean()


def test_children_on_glass_are_kept_and_marked(cmu_path):
    with open_slide(cmu_path) as slide:
        bag, _ = make_bag(slide, PatchOptions((8, 1), 32))
    coarse, fine = bag.levels
    assert len(fine) == 64 * len(coarse)
    assert (fine.tissue == 0).any(), "CMU's coarse patches reach over glass"
    assert (fine.tissue > 0.5).any()
