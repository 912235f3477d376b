"""Level choice on real geometry, and the paper's printed table."""

from __future__ import annotations

import pytest

from napari_magnet.slide import SlideGeometry, open_slide, paper_level


def test_enough_pixels_on_cmu_single_level(cmu_path):
    with open_slide(cmu_path) as slide:
        assert slide.geometry.choose_level(2967, 2967, 112) == 0
        assert slide.geometry.choose_level(50, 50, 112) == 0


def test_enough_pixels_on_ndpi_seven_levels(ndpi_path):
    with open_slide(ndpi_path) as slide:
        g = slide.geometry
        # Whole slide (longer side 4864) at 112: 4864/32 = 152 ≥ 112 > 4864/64 = 76.
        assert g.choose_level(3968, 4864, 112) == 5
        assert g.choose_level(3968, 4864, 448) == 3  # 4864/8 = 608 ≥ 448 > 304
        assert g.choose_level(112 * 4, 100, 112) == 2
        assert g.choose_level(111, 111, 112) == 0  # nothing is big enough: level 0


def test_enough_pixels_with_float_downsamples(boxes_path):
    with open_slide(boxes_path) as slide:
        g = slide.geometry
        # 300 / 4.016 = 74.7 ≥ 74 but < 75; 300 / 8.086 = 37.1.
        assert g.choose_level(300, 250, 74) == 2
        assert g.choose_level(300, 250, 75) == 1
        assert g.choose_level(300, 250, 37) == 3


def paper_pyramid() -> SlideGeometry:
    dims = tuple((50_000 // 2**k, 100_000 // 2**k) for k in range(9))
    return SlideGeometry(dims, tuple(float(2**k) for k in range(9)))


@pytest.mark.parametrize(
    ("width", "height", "level"),
    [
        (25_001, 100, 8),
        (100, 50_001, 8),  # wider than 25,000 or taller than 50,000
        (12_501, 100, 7),
        (100, 25_001, 7),
        (24_000, 49_000, 7),
        (6_300, 100, 6),
        (3_200, 100, 5),
        (1_600, 100, 4),
        (800, 100, 3),
        (400, 100, 2),
        (200, 100, 1),
        (195, 390, 0),  # below 196 and 391
        (195, 392, 1),
    ],
)
def test_paper_rule_reproduces_printed_table(width, height, level):
    g = paper_pyramid()
    assert g.choose_level(width, height, 112, rule="paper") == level
    assert paper_level(g.dimensions, g.level_count, width, height) == level


def test_paper_rule_reads_more_than_enough_rule():
    g = paper_pyramid()
    # A tall 1,000 x 10,000 region: the paper's rule follows the width's ratio (R = min) and
    # reads it at level 5 (312 px tall); 112 px only need level 6 (156 px tall).
    paper = g.choose_level(1_000, 10_000, 112, rule="paper")
    enough = g.choose_level(1_000, 10_000, 112, rule="enough")
    assert (paper, enough) == (5, 6)
    assert 10_000 / g.level_downsamples[enough] >= 112


def test_unknown_rule_is_rejected():
    with pytest.raises(ValueError, match="unknown level rule"):
        paper_pyramid().choose_level(10, 10, 10, rule="nearest")
