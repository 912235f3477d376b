"""The ``napari-magnet`` command on real files."""

from __future__ import annotations

import json

import pytest

from napari_magnet.cli import main
from napari_magnet.slide import open_slide
from napari_magnet.synth import read_ground_truth


def test_synth_writes_a_slide_openslide_opens_with_its_truth(tmp_path, capsys):
    out = tmp_path / "one.tif"
    assert (
        main(
            [
                "synth",
                "--out",
                str(out),
                "--width",
                "4096",
                "--height",
                "3072",
                "--seed",
                "5",
                "--lesion",
                "macro",
                "--mpp",
                "1.0",
                "--quiet",
            ]
        )
        == 0
    )
    truth = read_ground_truth(out)
    assert truth.label == 1 and truth.lesion_kind == "macro"
    with open_slide(out) as slide:
        assert slide.dimensions == (4096, 3072)
        assert slide.mpp == pytest.approx((1.0, 1.0))
        assert slide.level_count > 1
    assert "wrote" in capsys.readouterr().out


def test_synth_rejects_absurd_parameters(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x.tif"), "--width", "10", "--quiet"]) == 2
    assert "width" in capsys.readouterr().err


def test_info_prints_geometry(cmu_path, capsys):
    assert main(["info", str(cmu_path)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["dimensions"] == [2220, 2967] and meta["units"] == "µm"


def test_info_on_a_broken_file_is_a_clear_error(capsys):
    from .conftest import wsi

    assert main(["info", str(wsi("broken.svs"))]) == 2
    err = capsys.readouterr().err
    assert "broken.svs" in err and "not a slide" in err


def test_magnify_headless_writes_the_export_folder(cmu_path, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "magnify",
                str(cmu_path),
                "--model",
                "magnet3-lite",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    assert {"rois.geojson", "annotations.geojson", "result.json"} <= names
    assert any(n.startswith("attention_L3_") and n.endswith(".ome.tif") for n in names)
    result = json.loads((out / "result.json").read_text())
    assert result["result"]["pixels_processed"] == (10 * 56**2 + 18 * 224**2) * 3
    rois = json.loads((out / "rois.geojson").read_text())
    assert len(rois["features"]) == 3 + 6 + 18
    assert "probability" in capsys.readouterr().out


def test_magnify_with_an_unknown_model_is_a_clear_error(cmu_path, tmp_path, capsys):
    assert main(["magnify", str(cmu_path), "--model", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
