"""Export and import in a real viewer: writers, readers, Export all, bad GeoJSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from napari.utils.notifications import notification_manager

from napari_magnet._napari.layers import add_roi_layer, layer_info, layer_kind
from napari_magnet.io.annotation import Annotation, rectangle
from napari_magnet.io.geojson_write import write_geojson
from napari_magnet.io.ome import read_attention_ome_tiff
from napari_magnet.io.results import export_run
from napari_magnet.io.rois import RoiTable

from ..io.samples import step
from .helpers import ours


def world_vertices(layer):
    return [
        np.asarray(d)[:, -2:] * np.asarray(layer.scale)[-2:] + np.asarray(layer.translate)[-2:]
        for d in layer.data
    ]


def annotate(viewer, widget, slide):
    (layer,) = ours(viewer, "annotations")
    mx, my = slide.metadata["mpp"]
    layer.add(np.array([[100 * my, 200 * mx], [600 * my, 900 * mx]]), shape_type="rectangle")
    layer.add(
        np.array(
            [
                [900 * my, 300 * mx],
                [1300 * my, 700 * mx],
                [1500 * my, 100 * mx],
                [1000 * my, 50 * mx],
            ]
        ),
        shape_type="polygon",
    )
    layer.add(
        np.array([[1600, 1600], [1600, 2100], [2000, 2100], [2000, 1600]]) * [my, mx],
        shape_type="ellipse",
    )  # its bounding box's corners
    layer.selected_data = {0}
    widget.set_class("Tumor", layer)
    widget.set_review("accepted", layer)
    layer.selected_data = {1}
    widget.set_class("Normal", layer)
    widget.set_review("rejected", layer)
    layer.selected_data = set()
    return layer


def test_geojson_round_trip_through_the_plugin_writer_and_reader(setup, tmp_path):
    import napari

    viewer, widget, slide = setup
    layer = annotate(viewer, widget, slide)
    path = tmp_path / "out" / "annotations.geojson"
    path.parent.mkdir()
    written = napari.save_layers(str(path), [layer], plugin="napari-magnet")
    assert written == [str(path)]
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 3
    width, height = slide.metadata["slide"].dimensions
    for feat in doc["features"]:
        # what QuPath needs
        assert feat["type"] == "Feature" and isinstance(feat["id"], str)
        geom = feat["geometry"]
        assert geom["type"] == "Polygon"
        ring = np.asarray(geom["coordinates"][0])
        assert (ring[0] == ring[-1]).all() and len(ring) >= 4
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= width  # level-0 pixels
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= height
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and len(cls["color"]) == 3
        assert props["napari_magnet"]["mpp"] == list(slide.metadata["mpp"])
    first = np.asarray(doc["features"][0]["geometry"]["coordinates"][0])[:4]
    assert sorted(map(tuple, np.round(first, 3))) == [
        (200, 100),
        (200, 600),
        (900, 100),
        (900, 600),
    ]  # (x, y) level-0 px

    (back,) = viewer.open(str(path), plugin="napari-magnet")
    assert layer_kind(back) == "imported"
    assert list(back.features["class"]) == ["Tumor", "Normal", "Tumor"]
    assert list(back.features["review"]) == ["accepted", "rejected", "unreviewed"]
    assert list(back.shape_type) == ["rectangle", "polygon", "polygon"]  # ellipse → 64-gon
    for a, b in zip(world_vertices(layer)[:2], world_vertices(back)[:2]):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-4)
    e_in, e_back = world_vertices(layer)[2], world_vertices(back)[2]
    np.testing.assert_allclose([e_back.min(0), e_back.max(0)], [e_in.min(0), e_in.max(0)], atol=0.5)
    # and through the widget's import (placed on the current slide)
    imported = widget.import_geojson(str(path))
    assert imported is not None and imported.nshapes == 3
    for a, b in zip(world_vertices(layer)[:2], world_vertices(imported)[:2]):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-4)


def test_export_all_and_attention_ome_tiff_reopens_aligned(setup, qtbot, tmp_path):
    import napari

    viewer, widget, slide = setup
    annotate(viewer, widget, slide)
    widget.set_model("ats")
    widget.set_device("cpu")
    widget.run_magnify()
    qtbot.waitUntil(lambda: not widget.is_running, timeout=240_000)
    (rois,) = ours(viewer, "rois")
    rois.selected_data = {0, 1}
    widget.set_review("accepted", rois)

    out = tmp_path / "export"
    files = widget.export_all(str(out))
    names = sorted(p.name for p in files)
    assert names == ["annotations.geojson", "attention_L1_0.ome.tif", "result.json", "rois.geojson"]
    result = json.loads((out / "result.json").read_text())
    assert result["result"]["model_name"] == "ats"
    assert 0 <= result["result"]["probability"] <= 1
    roi_doc = json.loads((out / "rois.geojson").read_text())
    assert len(roi_doc["features"]) == 20
    reviews = [f["properties"]["napari_magnet"]["review"] for f in roi_doc["features"]]
    assert reviews[:3] == ["accepted", "accepted", "unreviewed"]
    assert len(json.loads((out / "annotations.geojson").read_text())["features"]) == 3
    amap = read_attention_ome_tiff(out / "attention_L1_0.ome.tif")
    assert amap.mpp == pytest.approx(slide.metadata["mpp"])
    # rois.geojson reopens as the run's ROI layer: same place, ids, review states and labels
    (back_rois,) = viewer.open(str(out / "rois.geojson"), plugin="napari-magnet")
    assert_same_roi_layer(rois, back_rois)

    # the attention layer through the plugin's OME-TIFF writer, then reopened
    (att,) = ours(viewer, "attention")
    path = tmp_path / "att.ome.tif"
    assert napari.save_layers(str(path), [att], plugin="napari-magnet") == [str(path)]
    (back,) = viewer.open(str(path), plugin="napari-magnet")
    assert layer_kind(back) == "attention"
    np.testing.assert_allclose(
        np.asarray(back.extent.world), np.asarray(att.extent.world), atol=1e-6
    )
    np.testing.assert_allclose(back.scale, att.scale)
    np.testing.assert_allclose(np.asarray(back.data), np.asarray(att.data))
    # the slide itself is refused by the attention writer
    from napari_magnet._napari.writers import write_attention_ome

    with pytest.warns(UserWarning):
        assert (
            napari.save_layers(str(tmp_path / "slide.ome.tif"), [slide], plugin="napari-magnet")
            == []
        )
    assert not (tmp_path / "slide.ome.tif").exists()
    with pytest.raises(ValueError, match="attention"):
        write_attention_ome(
            str(tmp_path / "slide.ome.tif"), slide.data[0], slide.as_layer_data_tuple()[1]
        )


# --------------------------------------------------------------------------------------------
# bad GeoJSON: a clear error, no layer, nothing else changes
# --------------------------------------------------------------------------------------------

GOOD_RING = [[10, 10], [200, 10], [200, 150], [10, 10]]


def feature(geometry, **props):
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {"objectType": "annotation", **props},
    }


def collection(*features):
    return {"type": "FeatureCollection", "features": list(features)}


huge = st.one_of(st.floats(2e7, 1e300), st.floats(-1e300, -2e7), st.integers(10**8, 10**30))
bad_documents = st.one_of(
    # malformed JSON
    st.text(max_size=40).map(lambda t: "{" + t + '"oops'),
    st.just(""),
    st.just("[1, 2,"),
    # JSON but not GeoJSON
    # (not "[]": an empty list of Features is an empty collection, which opens as an empty
    # layer)
    st.one_of(
        st.integers(), st.text(max_size=10), st.lists(st.integers(), min_size=1, max_size=3)
    ).map(json.dumps),
    st.just(json.dumps({"type": "Mystery"})),
    st.just(json.dumps({"features": []})),
    # wrong geometry types only
    st.sampled_from(["Point", "LineString"]).map(
        lambda kind: json.dumps(
            collection(
                feature(
                    {"type": kind, "coordinates": [5, 5] if kind == "Point" else [[0, 0], [5, 5]]}
                )
            )
        )
    ),
    st.just(json.dumps(collection(feature({"type": "Circle", "coordinates": [1, 2]})))),
    # huge coordinates
    huge.map(
        lambda v: json.dumps(
            collection(
                feature(
                    {"type": "Polygon", "coordinates": [[[10, 10], [v, 10], [200, 150], [10, 10]]]}
                )
            )
        )
    ),
    # missing fields
    st.sampled_from(["geometry", "coordinates", "type"]).map(
        lambda missing: json.dumps(
            collection(
                {
                    k: v
                    for k, v in feature(
                        {"type": "Polygon", "coordinates": [GOOD_RING]},
                    ).items()
                    if k != missing
                }
            )
            if missing != "coordinates"
            else collection(feature({"type": "Polygon"}))
        )
    ),
    # degenerate rings, non-numeric or non-finite coordinates
    st.just(
        json.dumps(
            collection(feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 5], [0, 0]]]}))
        )
    ),
    st.sampled_from(['"x"', "null", "true", "NaN", "Infinity", "[1]"]).map(
        lambda v: (
            '{"type": "FeatureCollection", "features": [{"type": "Feature", '
            '"properties": {}, "geometry": {"type": "Polygon", "coordinates": '
            f"[[[0, 0], [10, {v}], [20, 30], [0, 0]]]}}}}]}}"
        )
    ),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=bad_documents)
def test_bad_geojson_is_refused_with_a_clear_error(setup, tmp_path, text):
    viewer, widget, slide = setup
    path = tmp_path / "bad.geojson"
    path.write_text(text, encoding="utf-8")
    names = [lyr.name for lyr in viewer.layers]
    n_shapes = [getattr(lyr, "nshapes", None) for lyr in viewer.layers]

    n0 = len(notification_manager.records)
    assert widget.import_geojson(str(path)) is None
    new = notification_manager.records[n0:]
    assert len(new) == 1 and "bad.geojson" in str(new[0].message)
    assert str(new[0].severity).lower().endswith("error")

    with pytest.raises(Exception) as info:
        viewer.open(str(path), plugin="napari-magnet")
    chain = [info.value, info.value.__cause__, info.value.__context__]
    assert any(e is not None and "bad.geojson" in str(e) for e in chain)

    assert [lyr.name for lyr in viewer.layers] == names
    assert [getattr(lyr, "nshapes", None) for lyr in viewer.layers] == n_shapes


def test_reader_declines_other_files_and_reads_qupath_exports(tmp_path, make_napari_viewer):
    from napari_magnet._napari.geojson_reader import get_attention_reader, get_geojson_reader

    assert get_geojson_reader(str(tmp_path / "missing.geojson")) is None
    assert get_geojson_reader([str(tmp_path / "a.geojson"), str(tmp_path / "b.geojson")]) is None
    plain = tmp_path / "plain.ome.tif"
    import tifffile

    tifffile.imwrite(plain, np.zeros((8, 8), np.float32), ome=True)
    assert get_attention_reader(str(plain)) is None
    # a QuPath-style export: no mpp recorded → level-0 pixel units
    qupath = tmp_path / "qupath.geojson"
    qupath.write_text(
        json.dumps(
            [
                {
                    "type": "Feature",
                    "id": "x",
                    "geometry": {
                        "type": "MultiPolygon",
                        "coordinates": [
                            [[[0, 0], [100, 0], [100, 50], [0, 50], [0, 0]]],
                            [[[200, 200], [300, 200], [250, 260], [200, 200]]],
                        ],
                    },
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"names": ["Tumor"], "colorRGB": -3670016},
                    },
                },
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [1, 1]},
                    "properties": {},
                },
            ]
        )
    )
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(qupath), plugin="napari-magnet")
    assert layer.nshapes == 2 and tuple(layer.scale) == (1.0, 1.0)
    assert layer_info(layer)["units"] == "level-0 pixel"
    assert list(layer.features["class"]) == ["Tumor", "Tumor"]
    assert layer.metadata["skipped"]  # the point
    np.testing.assert_allclose(np.asarray(layer.data[0]).min(0), [0, 0])
    np.testing.assert_allclose(np.asarray(layer.data[0]).max(0), [50, 100])
    assert not math.isnan(np.asarray(layer.edge_width).sum())


# --------------------------------------------------------------------------------------------
# exported files reopen: an empty annotations.geojson, rois.geojson with its labels
# --------------------------------------------------------------------------------------------


def text_values(layer):
    return [str(v) for v in np.atleast_1d(layer.text.values)]


def assert_same_roi_layer(live, back):
    """A reopened ROI layer shows what the live one shows."""
    assert layer_kind(back) == "rois"
    assert layer_info(back)["layer"] == layer_info(live)["layer"]
    assert back.nshapes == live.nshapes
    for column in ("id", "parent", "layer", "level", "class", "review"):
        assert list(back.features[column]) == list(live.features[column]), column
    for a, b in zip(world_vertices(live), world_vertices(back)):
        np.testing.assert_allclose(np.sort(b, axis=0), np.sort(a, axis=0), rtol=1e-6, atol=1e-3)
    # the id labels: same strings, same text settings
    assert text_values(back) == text_values(live)
    assert text_values(back) == [str(v) for v in live.features["id"]]
    assert back.text == live.text
    assert back.face_color.tolist() == live.face_color.tolist()  # unfilled
    np.testing.assert_allclose(back.edge_color, live.edge_color)  # lineage / class colours


def test_empty_annotations_file_opens_as_an_empty_layer(setup, tmp_path):
    import napari
    from napari.layers import Shapes

    viewer, widget, slide = setup
    run = tmp_path / "run"
    export_run(run, slide.metadata["path"], slide.metadata["mpp"], [], None, [])
    n_layers = len(viewer.layers)
    n0 = len(notification_manager.records)
    (layer,) = viewer.open(str(run / "annotations.geojson"), plugin="napari-magnet")
    assert len(viewer.layers) == n_layers + 1
    assert isinstance(layer, Shapes) and layer.nshapes == 0 and layer.ndim == 2
    assert layer_kind(layer) == "imported" and layer.name == "annotations"
    assert not [r for r in notification_manager.records[n0:] if "error" in str(r.severity)]
    # what is drawn in it is saved in level-0 pixels of the viewer's slide (the file had no
    # mpp to record)
    mx, my = slide.metadata["mpp"]
    layer.add(np.array([[100 * my, 200 * mx], [600 * my, 900 * mx]]), shape_type="rectangle")
    out = tmp_path / "drawn.geojson"
    assert napari.save_layers(str(out), [layer], plugin="napari-magnet") == [str(out)]
    (feat,) = json.loads(out.read_text())["features"]
    ring = np.asarray(feat["geometry"]["coordinates"][0])
    np.testing.assert_allclose([ring.min(0), ring.max(0)], [[200, 100], [900, 600]], atol=1e-6)
    # an empty layer saved gives an empty collection, which opens again
    layer.data = []
    again = tmp_path / "again.geojson"
    assert napari.save_layers(str(again), [layer], plugin="napari-magnet") == [str(again)]
    assert json.loads(again.read_text()) == {"type": "FeatureCollection", "features": []}
    (reopened,) = viewer.open(str(again), plugin="napari-magnet")
    assert reopened.nshapes == 0


@pytest.mark.parametrize("reviewed", [True, False])
def test_reopened_rois_show_the_live_id_labels(setup, tmp_path, reviewed):
    viewer, widget, slide = setup
    mpp = slide.metadata["mpp"]
    steps = [
        step(1, [[0, 0, 1000, 800], [1200, 0, 2000, 900]], ["1", "2"]),
        step(
            2,
            [[10, 10, 200, 200], [20, 20, 220, 220], [1300, 100, 1302, 102]],
            ["1.1", "1.2", "2.1"],
            parents=["1", "1", "2"],
        ),
    ]
    review = {"1.2": ("Tumor", "accepted"), "2": ("", "rejected")} if reviewed else None
    run = tmp_path / "run"
    # reviewed: as the widget's Export all writes it (mpp recorded); else as the CLI does
    export_run(run, slide.metadata["path"], mpp, steps, None, [], review_states=review)
    table = RoiTable.from_steps(steps).with_review(review or {})
    live = []
    for k in (1, 2):
        rows = [i for i, n in enumerate(table.layers) if n == k]
        part = RoiTable(
            ids=[table.ids[i] for i in rows],
            parent_ids=[table.parent_ids[i] for i in rows],
            layers=table.layers[rows],
            boxes=table.boxes[rows],
            levels=table.levels[rows],
            scales=table.scales[rows],
            attention_mass=table.attention_mass[rows],
            aux_probability=table.aux_probability[rows],
            probability=table.probability[rows],
            classes=[table.classes[i] for i in rows],
            reviews=[table.reviews[i] for i in rows],
        )
        data = part.to_layer_data(mpp if reviewed else None)
        live.append(add_roi_layer(viewer, slide, data.rects, data.features, k, run="live"))
    back = viewer.open(str(run / "rois.geojson"), plugin="napari-magnet")
    assert [b.name for b in back] == ["rois · L1 ROIs", "rois · L2 ROIs"]  # deeper above
    for a, b in zip(live, back):
        if reviewed:
            assert_same_roi_layer(a, b)
        else:  # no mpp recorded: level-0 pixels, the labels all the same
            assert layer_info(b)["units"] == "level-0 pixel"
            assert text_values(b) == text_values(a) and b.text.string == a.text.string
            assert list(b.features["id"]) == list(a.features["id"])
    # reviewed again and saved, the lineage survives
    if reviewed:
        out = tmp_path / "again.geojson"
        import napari

        assert napari.save_layers(str(out), [back[1]], plugin="napari-magnet") == [str(out)]
        props = [f["properties"] for f in json.loads(out.read_text())["features"]]
        assert [p["napari_magnet"]["region_id"] for p in props] == ["1.1", "1.2", "2.1"]
        assert [p["napari_magnet"]["parent_id"] for p in props] == ["1", "1", "2"]
        assert props[1]["classification"]["name"] == "Tumor"


def test_a_file_of_annotations_and_rois_opens_as_separate_layers(tmp_path, make_napari_viewer):
    # e.g. an autosave opened with File > Open: annotations, then one layer per ROI layer
    rois = RoiTable.from_steps(
        [step(1, [[0, 0, 100, 100]], ["1"]), step(2, [[5, 5, 50, 50]], ["1.1"], ["1"])],
        slide_name="s.svs",
    ).to_annotations(mpp=(0.5, 0.5), mark_as_roi=True)
    drawn = Annotation(
        polygon=rectangle(10, 10, 60, 40),
        classification="Tumor",
        properties={"napari_magnet": {"kind": "annotation", "mpp": [0.5, 0.5]}},
    )
    path = write_geojson(tmp_path / "s.svs.annotations.geojson", [rois[1], drawn, rois[0]])
    viewer = make_napari_viewer()
    layers = viewer.open(str(path), plugin="napari-magnet")
    assert [lyr.name for lyr in layers] == [
        "s.svs.annotations",
        "s.svs.annotations · L1 ROIs",
        "s.svs.annotations · L2 ROIs",
    ]
    assert [layer_kind(lyr) for lyr in layers] == ["imported", "rois", "rois"]
    assert list(layers[0].features["class"]) == ["Tumor"]
    assert [text_values(lyr) for lyr in layers[1:]] == [["1"], ["1.1"]]
    assert all(lyr.metadata["slide_name"] == "s.svs" for lyr in layers[1:])
    # all in µm: the annotation's level-0 box (10, 10)–(60, 40) is at (5, 5)–(20, 30) µm
    np.testing.assert_allclose(
        [world_vertices(layers[0])[0].min(0), world_vertices(layers[0])[0].max(0)],
        [[5, 5], [20, 30]],
    )
    np.testing.assert_allclose(world_vertices(layers[2])[0].max(0), [25, 25])
