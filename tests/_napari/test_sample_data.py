"""File ▸ Open Sample: the project's synthetic slide, generated into the user cache once."""

from __future__ import annotations

import pytest

from napari_magnet.synth import read_ground_truth


def test_small_sample_opens_as_a_slide_layer_and_is_reused(
    make_napari_viewer, tmp_path, monkeypatch
):
    monkeypatch.setenv("NAPARI_MAGNET_CACHE_DIR", str(tmp_path))
    viewer = make_napari_viewer(show=True)
    (layer,) = viewer.open_sample("napari-magnet", "synthetic-small")
    slide = layer.metadata["slide"]
    assert slide.dimensions == (12_288, 9_216)
    assert tuple(layer.scale) == pytest.approx((0.5, 0.5))
    assert layer.multiscale and len(layer.data) == slide.level_count
    truth = read_ground_truth(slide.path)
    assert truth.label == 1 and truth.lesion_kind == "macro"
    made = slide.path.stat().st_mtime_ns
    (again,) = viewer.open_sample("napari-magnet", "synthetic-small")
    assert again.metadata["slide"].path == slide.path
    assert slide.path.stat().st_mtime_ns == made  # reused, not regenerated
