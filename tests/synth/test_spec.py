"""The spec, lesion and argument checks of the synthetic-slide package, and its imports."""

from __future__ import annotations

import pytest

from napari_magnet.synth import (
    Lesion,
    SyntheticSlideSpec,
    generate_cohort,
    generate_slide,
    read_ground_truth,
)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 32, "height": 4096}, "width"),
        ({"width": 4096, "height": 2**31}, "height"),
        ({"width": 4096.5, "height": 4096}, "width"),
        ({"mpp": 0.0}, "mpp"),
        ({"mpp": -0.5}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"lesion_kind": "huge"}, "lesion kind"),
        ({"lesion_kind": "distractor"}, "lesion kind"),
        ({"label": 0, "lesion_kind": "macro"}, "contradicts"),
        ({"label": 1, "lesion_kind": "negative"}, "contradicts"),
        ({"label": 2}, "label"),
        ({"seed": -1}, "seed"),
        ({"tile": 100}, "tile"),
        ({"quality": 0}, "quality"),
        ({"width": 1024, "height": 1024, "lesion_kind": "macro"}, "too small"),
        ({"width": 64, "height": 64, "mpp": 0.25, "label": 1}, "too small"),
    ],
)
def test_spec_validation(kwargs, match):
    args = {"width": 4096, "height": 4096, "mpp": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        SyntheticSlideSpec(**args)


def test_other_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="lesion kind"):
        Lesion("tumour", (0, 0, 1, 1))
    with pytest.raises(ValueError, match="x1 > x0"):
        Lesion("itc", (5, 0, 1, 1))
    with pytest.raises(ValueError, match="SyntheticSlideSpec"):
        generate_slide(tmp_path / "x.tif", {"width": 4096})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must"):
        generate_cohort(tmp_path, n=0, seed=0, width=4096, height=4096)
    with pytest.raises(ValueError, match="mpp"):
        generate_cohort(tmp_path, n=2, seed=0, width=4096, height=4096, mpp=0)
    with pytest.raises(ValueError, match="positives must name"):
        generate_cohort(tmp_path, n=2, seed=0, width=4096, height=4096, positives=["tumour"])
    with pytest.raises(ValueError, match="too small for"):  # 1 mm: no room for a macro lesion
        generate_cohort(
            tmp_path, n=2, seed=0, width=1024, height=1024, mpp=1.0, positives=["macro"]
        )
    with pytest.raises(ValueError, match="jobs"):
        generate_cohort(tmp_path, n=2, seed=0, width=4096, height=4096, jobs=0)
    assert not list(tmp_path.iterdir())  # nothing written on bad arguments
    with pytest.raises(FileNotFoundError):
        read_ground_truth(tmp_path / "missing.tif")
    (tmp_path / "other.truth.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a napari-magnet"):
        read_ground_truth(tmp_path / "other.tif")


def test_imports_neither_torch_nor_napari():
    import subprocess
    import sys

    code = (
        "import sys, napari_magnet.synth; "
        "bad = [m for m in ('torch', 'napari', 'qtpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
