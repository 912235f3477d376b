"""Colours: by class, by lineage, and the review styling of shapes."""

from __future__ import annotations

import numpy as np

from napari_magnet.io.colors import branch_color, class_color, review_style


def test_class_colours():
    assert class_color("Tumor") == (200, 0, 0)
    assert class_color("tumor") == (200, 0, 0)
    assert class_color("Normal") == (0, 150, 0)
    assert class_color("Other") == (255, 200, 0)
    assert class_color("Stroma") == class_color("Stroma")  # deterministic
    assert class_color("Stroma") != class_color("Necrosis")
    assert class_color("Stroma", {"Stroma": (1, 2, 3)}) == (1, 2, 3)
    assert all(0 <= c <= 255 for c in class_color("anything at all"))


def test_branch_colours_by_root_and_depth():
    assert branch_color("1") != branch_color("2") != branch_color("3")
    assert branch_color("2.1") == branch_color("2.4")  # same branch, same layer
    assert sum(branch_color("2.1.1")) > sum(branch_color("2.1")) > sum(branch_color("2"))
    assert branch_color("12") == branch_color("12") and branch_color("x.1") == branch_color("x.2")


def test_review_style_bold_accepted_thin_grey_rejected():
    edges, faces, widths = review_style(
        ["Tumor", "Tumor", ""], ["accepted", "rejected", "unreviewed"]
    )
    assert widths.tolist() == [2.5, 0.5, 1.0]
    np.testing.assert_allclose(edges[0][:3], np.array([200, 0, 0]) / 255)
    assert edges[1][0] == edges[1][1] == edges[1][2]  # grey
    assert faces[1][3] == 0 and faces[0][3] > 0 and faces[2][3] == 0


def test_branch_colours_stand_apart_from_the_attention_colours():
    """An ROI outline must show on the attention map under it: every branch colour, at every
    depth, is far (RGB distance > 60) from each colour of the overlays' viridis range."""
    import numpy as np
    from napari.utils.colormaps import AVAILABLE_COLORMAPS

    viridis = np.asarray(AVAILABLE_COLORMAPS["viridis"].map(np.linspace(0.25, 1.0, 64)))
    viridis = viridis[:, :3] * 255
    for root in range(1, 41):
        for depth in range(1, 4):
            rid = ".".join([str(root)] + ["1"] * (depth - 1))
            rgb = np.asarray(branch_color(rid), float)
            assert np.linalg.norm(viridis - rgb, axis=1).min() > 60, (rid, rgb)
