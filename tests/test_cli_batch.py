"""``napari-magnet batch CSV`` and ``napari-magnet patch --workers/--scheduler`` on dask."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from napari_magnet.cli import main  # noqa: E402
from napari_magnet.synth import generate_cohort  # noqa: E402

MODEL = ["--model", "magnet3-lite", "--device", "cpu"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort")
    generate_cohort(folder, 3, 5, 2048, 2048, 2.0)
    return folder


@pytest.fixture(scope="module")
def scheduler():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address


def _summary(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_batch_exports_every_slide_reports_failures_and_resumes(
    cohort, scheduler, tmp_path, capsys
):
    local = tmp_path / "cohort"
    shutil.copytree(cohort, local)
    broken = local / "slide_0002.tif"
    broken.write_bytes(broken.read_bytes()[:5000])  # corrupted on purpose
    out = tmp_path / "out"
    rc = main(["batch", str(local / "cohort.csv"), *MODEL, "--out", str(out), "--workers", "2"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "slide_0002.tif" in captured.err and "1 failed" in captured.out
    rows = _summary(out / "summary.csv")
    assert list(rows[0]) == ["slide", "status", "probability", "seconds", "error"]
    assert [r["status"] for r in rows] == ["written", "written", "failed"]
    assert rows[2]["error"] and rows[2]["probability"] == ""
    assert not (out / "slide_0002").exists()
    assert sorted(p.name for p in out.iterdir()) == ["slide_0000", "slide_0001", "summary.csv"]

    # the same files as `napari-magnet magnify --out` writes, with the same results
    serial = tmp_path / "serial"
    assert main(["magnify", str(local / "slide_0001.tif"), *MODEL, "--out", str(serial)]) == 0
    folder = out / "slide_0001"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in serial.iterdir())
    ours = json.loads((folder / "result.json").read_text())
    theirs = json.loads((serial / "result.json").read_text())
    assert ours["result"]["probability"] == theirs["result"]["probability"]
    assert float(rows[1]["probability"]) == pytest.approx(ours["result"]["probability"], abs=1e-6)
    # dask workers run torch on one thread: coordinates agree to float rounding, not bits
    assert _rounded(json.loads((folder / "rois.geojson").read_text())) == _rounded(
        json.loads((serial / "rois.geojson").read_text())
    )

    # resumed on an existing cluster: finished slides are skipped, their probability kept
    stamp = (folder / "result.json").stat().st_mtime_ns
    rc = main(
        ["batch", str(local / "cohort.csv"), *MODEL, "--out", str(out), "--scheduler", scheduler]
    )
    assert rc == 1
    again = _summary(out / "summary.csv")
    assert [r["status"] for r in again] == ["skipped", "skipped", "failed"]
    assert again[1]["probability"] == rows[1]["probability"]
    assert (folder / "result.json").stat().st_mtime_ns == stamp
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]

    # another model over the same folder redoes the slides: a folder is the model's own
    other = ["--model", "ats", "--device", "cpu"]
    rc = main(["batch", str(local / "cohort.csv"), *other, "--out", str(out), "--workers", "1"])
    assert rc == 1
    assert [r["status"] for r in _summary(out / "summary.csv")] == ["written", "written", "failed"]
    assert json.loads((folder / "result.json").read_text())["result"]["model_name"] == "ats"


def test_patch_on_a_scheduler_matches_the_serial_verb(cohort, scheduler, tmp_path, capsys):
    slides = [str(p) for p in sorted(cohort.glob("slide_*.tif"))]
    args = ["--mpp", "8,4,2", "--patch-size", "64", "--quiet"]
    assert main(["patch", *slides, "--out", str(tmp_path / "serial"), *args]) == 0
    rc = main(["patch", *slides, "--out", str(tmp_path / "dask"), *args, "--scheduler", scheduler])
    assert rc == 0
    assert "3 written, 0 skipped, 0 failed" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "dask").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "serial").iterdir())
    rc = main(["patch", *slides, "--out", str(tmp_path / "dask"), *args, "--workers", "1"])
    assert rc == 0
    assert "0 written, 3 skipped, 0 failed" in capsys.readouterr().out


def test_evaluate_on_a_scheduler_equals_the_serial_evaluation(cohort, scheduler, tmp_path):
    csv_path = str(cohort / "cohort.csv")
    serial, dask = tmp_path / "serial.json", tmp_path / "dask.json"
    args = ["evaluate", "--slides", csv_path, *MODEL, "--quiet"]
    assert main([*args, "--out", str(serial)]) == 0
    assert main([*args, "--out", str(dask), "--scheduler", scheduler]) == 0
    ours, theirs = json.loads(dask.read_text()), json.loads(serial.read_text())
    assert ours.keys() == theirs.keys()
    for mine, serial_row in zip(ours["summary"], theirs["summary"], strict=True):
        assert mine.keys() == serial_row.keys()
        assert {k: v for k, v in mine.items() if "seconds" not in k} == {
            k: v for k, v in serial_row.items() if "seconds" not in k
        }
    probabilities = [(s["path"], s["probability"]) for s in ours["slides"]]
    assert probabilities == [(s["path"], s["probability"]) for s in theirs["slides"]]


def _rounded(value, places: int = 3):
    """JSON with every float rounded (level-0 pixels: 1/1000 px)."""
    if isinstance(value, dict):
        return {k: _rounded(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, places) for v in value]
    if isinstance(value, float):
        return round(value, places)
    return value


def test_embed_on_a_scheduler_matches_the_serial_verb(cohort, scheduler, tmp_path, capsys):
    """``embed --scheduler``: one task per bag; the features equal the serial verb's, a
    broken bag is reported and the rest finish, and a second run skips every finished bag."""
    import h5py
    import numpy as np

    slides = [str(p) for p in sorted(cohort.glob("slide_*.tif"))]
    bags = tmp_path / "bags"
    patch = ["patch", *slides, "--out", str(bags), "--mpp", "8,4", "--patch-size", "32"]
    assert main([*patch, "--quiet"]) == 0
    embed = ["embed", "--patches", str(bags), "--encoder", "torchvision:resnet18"]
    embed += ["--device", "cpu", "--dtype", "float32", "--batch-size", "16", "--quiet"]
    assert main([*embed, "--out", str(tmp_path / "serial")]) == 0
    broken = bags / "slide_9999.h5"
    broken.write_bytes(b"not an HDF5 file")
    rc = main([*embed, "--out", str(tmp_path / "dask"), "--scheduler", scheduler])
    captured = capsys.readouterr()
    assert rc == 1
    assert "3 written, 0 skipped, 1 failed" in captured.out
    assert "slide_9999.h5" in captured.err
    for name in (Path(s).stem + ".h5" for s in slides):
        with h5py.File(tmp_path / "serial" / name) as a, h5py.File(tmp_path / "dask" / name) as b:
            for level in a.attrs["levels"]:
                np.testing.assert_allclose(
                    b[f"{level}/features"][()], a[f"{level}/features"][()], rtol=1e-4, atol=1e-5
                )
    broken.unlink()
    rc = main([*embed, "--out", str(tmp_path / "dask"), "--workers", "1"])
    assert rc == 0
    assert "0 written, 3 skipped, 0 failed" in capsys.readouterr().out
