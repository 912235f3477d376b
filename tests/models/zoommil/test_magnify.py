"""ZoomMIL through ``magnify`` on generated slides: what it streams, and what it embeds."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import tifffile
import torch

from napari_magnet import load_model, magnify, open_slide
from napari_magnet.bags.embedding import embed_bags
from napari_magnet.bags.encoders import build_encoder
from napari_magnet.bags.patching import PatchOptions, patch_slides
from napari_magnet.bags.records import BagLevel
from napari_magnet.bags.tissue import TissueOptions
from napari_magnet.engine.frames import start_region
from napari_magnet.engine.regions import RegionReader
from napari_magnet.engine.types import MagnifyOptions, MagnifyResult, MagnifyStep
from napari_magnet.models.zoommil import (
    bag_sizes,
    first_bag_rows,
    magnify_zoommil,
    slide_grid,
    stored_first_features,
)
from napari_magnet.synth import SyntheticSlideSpec, generate_slide

# napari-small's weights are not shipped yet: its features are random until they are.
pytestmark = pytest.mark.filterwarnings("ignore::napari_magnet.bags.encoders.RandomFeaturesWarning")

SIDE = 4096


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    """4096² at 0.5 µm/px with tumour: 12 coarse (8 µm/px) patches hold tissue."""
    path = tmp_path_factory.mktemp("zoommil") / "lesion.tif"
    spec = SyntheticSlideSpec(
        width=SIDE, height=SIDE, mpp=0.5, seed=2, label=1, lesion_kind="micro"
    )
    generate_slide(path, spec)
    return path


@pytest.fixture(scope="module")
def zoommil():
    return load_model("zoommil", device="cpu")


def run(path, model, **kw) -> tuple[list[MagnifyStep], MagnifyResult]:
    with open_slide(path) as slide:
        items = list(magnify(slide, model, device="cpu", **kw))
    assert all(isinstance(s, MagnifyStep) for s in items[:-1])
    assert isinstance(items[-1], MagnifyResult)
    return items[:-1], items[-1]


@pytest.fixture(scope="module")
def reference(slide_path, zoommil):
    return run(slide_path, zoommil, keep_patches=True)


def grid(path, config):
    with open_slide(path) as slide:
        return slide_grid(slide, config)


def inside(inner: np.ndarray, outer: np.ndarray, tol: float = 1.0) -> bool:
    return bool(
        (inner[..., :2] >= outer[..., :2] - tol).all()
        and (inner[..., 2:] <= outer[..., 2:] + tol).all()
    )


def test_one_step_per_magnification_with_nested_ids(reference, zoommil):
    steps, result = reference
    cfg = zoommil.config
    assert [s.layer for s in steps] == [1, 2, 3]
    k = [min(cfg.k[0], 12), cfg.k[1], cfg.k[1]]
    assert [len(s.region_ids) for s in steps] == k
    assert steps[0].region_ids == [str(i) for i in range(1, k[0] + 1)]
    assert steps[0].parent_ids == [""] * k[0]
    for parent_step, step in zip(steps, steps[1:]):
        assert len(set(step.region_ids)) == len(step.region_ids)
        for rid, pid in zip(step.region_ids, step.parent_ids):
            assert pid in parent_step.region_ids
            assert rid.rsplit(".", 1)[0] == pid
        # j counts each parent's picks from 1
        for pid in set(step.parent_ids):
            js = [
                int(r.rsplit(".", 1)[1])
                for r, p in zip(step.region_ids, step.parent_ids)
                if p == pid
            ]
            assert js == list(range(1, len(js) + 1))
    assert steps[2].region_ids[0].count(".") == 2  # e.g. "3.2.4"
    assert 0.0 <= result.probability <= 1.0 and result.label == int(result.probability >= 0.5)
    assert result.model_name == "zoommil" and result.config_hash == cfg.config_hash()


def test_boxes_nest_inside_the_slide_and_their_parents(reference, slide_path, zoommil):
    steps, _ = reference
    plans, _ = grid(slide_path, zoommil.config)
    for step, plan in zip(steps, plans):
        assert inside(step.boxes, np.array([0, 0, SIDE, SIDE]), tol=0)
        side = plan.extent[0]
        np.testing.assert_allclose(step.boxes[:, 2:] - step.boxes[:, :2], side, atol=1)
        assert (step.levels == plan.patch_level).all()
        patches = step.patches
        assert patches.shape == (len(step.region_ids), 64, 64, 3) and patches.dtype == np.uint8
    for parent_step, step in zip(steps, steps[1:]):
        boxes = dict(zip(parent_step.region_ids, parent_step.boxes))
        for pid, box in zip(step.parent_ids, step.boxes):
            assert inside(box, boxes[pid])
        # a child's side over its parent's: 1 / r
        parent_side = parent_step.boxes[0, 2] - parent_step.boxes[0, 0]
        np.testing.assert_allclose(step.scales * parent_side, step.boxes[0, 2] - step.boxes[0, 0])
    np.testing.assert_allclose(steps[0].scales, 1024 / SIDE)  # the patch over the frame


def test_attention_maps_cover_the_bag(reference, slide_path, zoommil):
    steps, _ = reference
    _, levels = grid(slide_path, zoommil.config)
    first = steps[0]
    (amap,) = first.attention_maps
    cols, rows = np.ptp(levels[0].grid, axis=0) + 1
    assert amap.shape == (rows, cols)
    assert (amap > 0).sum() == len(levels[0])  # one weight per patch of the bag, 0 elsewhere
    assert amap.sum() == pytest.approx(1.0, abs=1e-5)
    assert inside(first.boxes, first.attention_boxes[0])
    for mass in first.attention_mass:
        assert np.isclose(amap, mass, rtol=0, atol=1e-7).any()
    for parent_step, step in zip(steps, steps[1:]):
        r = round(np.sqrt(levels[step.layer - 1].children_per_parent()))
        assert len(step.attention_maps) == len(parent_step.region_ids)
        assert all(m.shape == (r, r) for m in step.attention_maps)
        np.testing.assert_allclose(step.attention_boxes, parent_step.boxes)
        assert sum(m.sum() for m in step.attention_maps) == pytest.approx(1.0, abs=1e-5)
        assert ((step.attention_mass > 0) & (step.attention_mass <= 1)).all()


def test_embeds_the_selected_children_only(reference, slide_path, zoommil):
    _, result = reference
    cfg = zoommil.config
    _, levels = grid(slide_path, cfg)
    n0 = len(levels[0])
    assert n0 == 12
    embedded = bag_sizes(cfg, n0)
    k0, k1 = cfg.k
    assert embedded == (12, k0 * 4, k1 * 16)
    every = sum(len(level) for level in levels)
    assert every == 12 * (1 + 4 + 64)
    assert result.pixels_processed == sum(embedded) * 64 * 64 * 3
    assert sum(embedded) < every / 4


def test_each_step_is_streamed_before_the_next_magnification_is_read(slide_path, zoommil):
    with open_slide(slide_path) as slide, RegionReader(slide) as reader, torch.inference_mode():
        frame, visible = start_region(slide, None)
        stream = magnify_zoommil(
            zoommil, reader, frame, visible, torch.device("cpu"), MagnifyOptions()
        )
        read = []
        for _ in range(3):
            next(stream)
            read.append(reader.pixels_read)
        with pytest.raises(StopIteration):
            next(stream)
    assert 0 < read[0] < read[1] < read[2]


def test_a_box_restricts_the_first_bag(slide_path, zoommil):
    box = (0.0, 0.0, SIDE / 2, SIDE)
    steps, result = run(slide_path, zoommil, box=box)
    _, levels = grid(slide_path, zoommil.config)
    n0 = len(first_bag_rows(levels[0], np.array(box)))
    assert 0 < n0 < len(levels[0])
    assert result.pixels_processed == sum(bag_sizes(zoommil.config, n0)) * 64 * 64 * 3
    for step in steps:
        assert inside(step.boxes, np.array(box), tol=0)
    assert (steps[0].boxes[:, 2] > steps[0].boxes[:, 0]).all()  # overlapping, not outside


def test_a_slide_without_pixel_size_is_refused(tmp_path, zoommil):
    path = tmp_path / "no-mpp.tif"
    image = np.full((1024, 1024, 3), 235, np.uint8)
    image[200:800, 200:800] = (190, 90, 160)
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="jpeg")
    with open_slide(path) as slide:
        assert slide.mpp is None
        with pytest.raises(ValueError, match="ZoomMIL needs the slide's pixel size"):
            list(magnify(slide, zoommil, device="cpu"))


def test_first_level_features_from_a_bag_file_beside_the_slide(
    tmp_path, slide_path, zoommil, reference
):
    cfg = zoommil.config
    steps, result = reference
    path = tmp_path / slide_path.name
    shutil.copyfile(slide_path, path)
    options = PatchOptions(
        mpps=cfg.mpps, patch_size=cfg.patch_size, tissue=TissueOptions(min_fraction=cfg.min_tissue)
    )
    (patched,) = patch_slides([path], tmp_path, options)
    encoder = build_encoder(cfg.encoder)
    (embedded,) = embed_bags([patched.output], tmp_path, encoder, dtype="float32")
    assert embedded.status == "written" and embedded.output == tmp_path / "lesion.h5"
    with open_slide(path) as slide:
        _, levels = slide_grid(slide, cfg)
        stored = stored_first_features(slide, zoommil, levels[0])
        assert stored is not None and stored.shape == (12, cfg.feature_dim)
        moved = BagLevel("mpp_8", levels[0].coords + 1, levels[0].extent, cfg.patch_size)
        assert stored_first_features(slide, zoommil, moved) is None  # another grid
    # the same features (float32): the same selection, the same prediction
    same_steps, same = run(path, zoommil)
    for a, b in zip(same_steps, steps, strict=True):
        assert a.region_ids == b.region_ids
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert same.probability == pytest.approx(result.probability, abs=1e-5)
    assert same.pixels_processed == result.pixels_processed
    assert same.pixels_read < result.pixels_read  # the first bag was not read from the slide

    group = embedded.output
    with h5py.File(group, "a") as f:  # other features, the same encoder: they are used
        features = f["mpp_8/features"]
        features[...] = features[()][::-1]
    other_steps, _ = run(path, zoommil)
    assert not np.array_equal(other_steps[0].boxes, steps[0].boxes)
    with h5py.File(group, "a") as f:  # ... unless another encoder made them
        features = f["mpp_8/features"]
        features.attrs["encoder"] = "resnet50-trunc"
        features.attrs["config_hash"] = "0" * 16
    ignored_steps, ignored = run(path, zoommil)
    for a, b in zip(ignored_steps, steps, strict=True):
        assert a.region_ids == b.region_ids
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert ignored.probability == pytest.approx(result.probability, abs=1e-6)


def test_abmil_shows_its_top_attention_patches(slide_path):
    abmil = load_model("abmil", device="cpu")
    (step,), result = run(slide_path, abmil)
    _, levels = grid(slide_path, abmil.config)
    assert step.region_ids == [str(i) for i in range(1, 9)]
    assert step.parent_ids == [""] * 8
    assert (np.diff(step.attention_mass) <= 0).all()
    assert step.attention_mass[0] == pytest.approx(step.attention_maps[0].max())
    np.testing.assert_allclose(step.boxes[:, 2] - step.boxes[:, 0], 128)  # 64 px at 1 µm/px
    assert result.pixels_processed == len(levels[0]) * 64 * 64 * 3
    assert len(levels[0]) > 200
