"""export_run and result.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_magnet.engine.types import MagnifyResult, MagnifyStep
from napari_magnet.io.geojson import Annotation, read_geojson, rectangle
from napari_magnet.io.ome import read_attention_ome_tiff
from napari_magnet.io.results import export_run, write_result_json


def _steps() -> list[MagnifyStep]:
    rng = np.random.default_rng(3)
    return [
        MagnifyStep(
            layer=1,
            region_ids=["1", "2"],
            parent_ids=["", ""],
            boxes=np.array([[0, 0, 2048, 2048], [2048, 2048, 4096, 4096]], float),
            levels=np.array([1, 1]),
            attention_maps=[rng.random((16, 16)).astype(np.float32)],
            attention_boxes=np.array([[0, 0, 8192, 8192]], float),
            attention_mass=np.array([0.6, 0.4]),
            scales=np.array([0.5, 0.5]),
            aux_probability=0.61,
        ),
        MagnifyStep(
            layer=2,
            region_ids=["1.1", "2.1"],
            parent_ids=["1", "2"],
            boxes=np.array([[0, 0, 512, 512], [2048, 2048, 2560, 2560]], float),
            levels=np.array([0, 0]),
            attention_maps=[
                rng.random((8, 8)).astype(np.float32),
                rng.random((8, 12)).astype(np.float32),
            ],
            attention_boxes=np.array([[0, 0, 2048, 2048], [2048, 2048, 5120, 4096]], float),
            attention_mass=np.array([0.7, 0.3]),
            scales=np.array([1.0, 1.0]),
        ),
    ]


def _result() -> MagnifyResult:
    return MagnifyResult(
        probability=0.87,
        label=1,
        pixels_processed=123456,
        pixels_read=234567,
        seconds=1.25,
        model_name="demo",
        checkpoint_sha256="ab" * 32,
        config_hash="cafe1234",
    )


def test_export_run(tmp_path):
    steps, result = _steps(), _result()
    user = [
        Annotation(
            polygon=rectangle(10, 10, 500, 400),
            name="mine",
            classification="Tumor",
            review="accepted",
        )
    ]
    out = tmp_path / "run"
    written = export_run(out, tmp_path / "slide_007.tif", (0.25, 0.25), steps, result, user)
    names = [p.name for p in written]
    assert names == [
        "rois.geojson",
        "annotations.geojson",
        "attention_L1_0.ome.tif",
        "attention_L2_0.ome.tif",
        "attention_L2_1.ome.tif",
        "result.json",
    ]
    assert all(p.is_file() and p.parent == out for p in written)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # nothing else, no temp files

    rois = read_geojson(out / "rois.geojson")
    assert [a.name for a in rois] == ["1", "2", "1.1", "2.1"]
    assert rois[0].measurements["Probability"] == pytest.approx(0.87)
    (mine,) = read_geojson(out / "annotations.geojson")
    assert mine.name == "mine" and mine.review == "accepted"

    m = read_attention_ome_tiff(out / "attention_L2_1.ome.tif")
    np.testing.assert_array_equal(m.array, steps[1].attention_maps[1])
    assert m.box == (2048.0, 2048.0, 5120.0, 4096.0) and m.mpp == (0.25, 0.25)

    doc = json.loads((out / "result.json").read_text())
    assert doc["format"] == "napari-magnet-result"
    assert doc["result"] == result.to_dict()
    assert doc["config_hash"] == "cafe1234"
    assert doc["slide_name"] == "slide_007.tif"
    assert doc["slide_path"].endswith("slide_007.tif")
    assert doc["slide_mpp"] == [0.25, 0.25]
    assert doc["files"] == names
    assert [lay["layer"] for lay in doc["layers"]] == [1, 2]
    l1 = doc["layers"][0]
    assert l1["n_regions"] == 2 and l1["aux_probability"] == 0.61
    assert l1["regions"][0] == {
        "id": "1",
        "parent_id": "",
        "box": [0.0, 0.0, 2048.0, 2048.0],
        "level": 1,
        "attention_mass": 0.6,
        "scale": 0.5,
    }
    assert doc["layers"][1]["attention_maps"][1]["file"] == "attention_L2_1.ome.tif"
    assert doc["layers"][1]["attention_maps"][1]["shape"] == [8, 12]


def test_export_run_empty_annotations_and_reexport(tmp_path):
    steps, result = _steps(), _result()
    out = tmp_path / "run"
    export_run(out, "slide.tif", None, steps, result)
    fc = json.loads((out / "annotations.geojson").read_text())
    assert fc == {"type": "FeatureCollection", "features": []}
    assert read_geojson(out / "annotations.geojson") == []
    # a second export with fewer maps into the same folder leaves no stale maps behind
    written = export_run(out, "slide.tif", None, steps[:1], result)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert read_attention_ome_tiff(out / "attention_L1_0.ome.tif").mpp is None


def test_export_run_without_result(tmp_path):
    written = export_run(tmp_path, "s.tif", (0.5, 0.5), _steps()[:1], None)
    doc = json.loads(written[-1].read_text())
    assert doc["result"] is None and doc["config_hash"] == ""
    rois = read_geojson(tmp_path / "rois.geojson")
    assert "Probability" not in rois[0].measurements


def test_write_result_json(tmp_path):
    p = write_result_json(
        tmp_path / "r.json",
        _result(),
        _steps(),
        {"note": np.float32(1.5), "bad": float("nan"), "arr": np.arange(3), "path": tmp_path},
    )
    doc = json.loads(p.read_text())
    assert doc["note"] == 1.5 and doc["bad"] is None and doc["arr"] == [0, 1, 2]
    assert doc["path"] == str(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        write_result_json(tmp_path / "r2.json", _result(), [], {"result": 1})
    assert not (tmp_path / "r2.json").exists()


def test_mismatched_attention_boxes(tmp_path):
    step = _steps()[0]
    step.attention_boxes = np.zeros((0, 4))
    with pytest.raises(ValueError, match="attention boxes"):
        export_run(tmp_path / "out", "s.tif", None, [step], _result())
    assert not (tmp_path / "out").exists()  # nothing written


def test_export_run_with_review_states(tmp_path):
    steps, result = _steps(), _result()
    out = tmp_path / "run"
    states = {"1": ("Tumor", "accepted"), "2.1": ("", "rejected"), "gone": ("Other", "accepted")}
    written = export_run(
        out, tmp_path / "slide_007.tif", (0.25, 0.5), steps, result, None, review_states=states
    )
    assert [p.name for p in written][:2] == ["rois.geojson", "annotations.geojson"]
    doc = json.loads((out / "rois.geojson").read_text())
    ours = [f["properties"]["napari_magnet"] for f in doc["features"]]
    assert [o["review"] for o in ours] == ["accepted", "unreviewed", "unreviewed", "rejected"]
    assert all(o["kind"] == "roi" and o["mpp"] == [0.25, 0.5] for o in ours)
    assert ours[2] == {
        "slide": "slide_007.tif",
        "region_id": "1.1",
        "parent_id": "1",
        "layer": 2,
        "kind": "roi",
        "mpp": [0.25, 0.5],
        "review": "unreviewed",
    }
    rois = read_geojson(out / "rois.geojson")
    assert [a.classification for a in rois] == ["Tumor", None, None, None]
    assert rois[0].measurements["Probability"] == pytest.approx(0.87)
    # the same ids as an export without review states: one ROI, one id
    plain = tmp_path / "plain"
    export_run(plain, tmp_path / "slide_007.tif", (0.25, 0.25), steps, result)
    assert [a.id for a in read_geojson(plain / "rois.geojson")] == [a.id for a in rois]
    assert all(
        "kind" not in a.properties["napari_magnet"] for a in read_geojson(plain / "rois.geojson")
    )


def test_export_run_review_states_without_mpp_and_empty(tmp_path):
    export_run(tmp_path, "s.tif", None, _steps()[:1], None, review_states={})
    ours = [
        f["properties"]["napari_magnet"]
        for f in json.loads((tmp_path / "rois.geojson").read_text())["features"]
    ]
    assert all(o["kind"] == "roi" and "mpp" not in o and o["review"] == "unreviewed" for o in ours)


def test_export_run_roi_annotations_without_steps(tmp_path):
    from napari_magnet.io.rois import RoiTable

    # ROIs as the viewer's layers give them (a restored run: no steps)
    layer_rois = RoiTable.from_steps(_steps(), slide_name="s.tif").to_annotations(
        mpp=(0.5, 0.5), mark_as_roi=True
    )
    layer_rois[1].review = "accepted"
    written = export_run(
        tmp_path / "run",
        "s.tif",
        (0.5, 0.5),
        [],
        None,
        review_states={"2.1": ("Normal", "rejected")},
        roi_annotations=layer_rois,
    )
    assert [p.name for p in written] == ["rois.geojson", "annotations.geojson", "result.json"]
    rois = read_geojson(tmp_path / "run" / "rois.geojson")
    assert [a.name for a in rois] == ["1", "2", "1.1", "2.1"]
    assert [a.review for a in rois] == ["unreviewed", "accepted", "unreviewed", "rejected"]
    assert rois[3].classification == "Normal"
    assert all(a.properties["napari_magnet"]["kind"] == "roi" for a in rois)
    assert rois[2].properties["napari_magnet"]["parent_id"] == "1"
    np.testing.assert_allclose(rois[2].polygon, layer_rois[2].polygon)
    assert rois[0].measurements == pytest.approx(layer_rois[0].measurements)


def test_export_run_bad_review_state_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="review states"):
        export_run(
            tmp_path / "out",
            "s.tif",
            None,
            _steps(),
            _result(),
            review_states={"1": ("Tumor", "maybe")},
        )
    assert not (tmp_path / "out").exists()
