"""Bag files: our layout, round trips, validation, atomic writes, features, and reading the
coordinate and feature files CLAM and TRIDENT write (made here by hand from their layouts)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from napari_magnet.bags import (
    BagError,
    PatchOptions,
    add_features,
    bag_kind,
    read_bag,
    validate_bag,
    write_bag,
)
from napari_magnet.bags.patching import make_bag
from napari_magnet.slide import open_slide

OPTIONS = PatchOptions(mpps=(8, 4, 1), patch_size=32)
CLAM_COORDS_ATTRS = ("patch_size", "patch_level", "downsample", "level_dim", "name")
TRIDENT_COORDS_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "name",
    "savetodir",
    "level0_width",
    "level0_height",
)


@pytest.fixture(scope="module")
def made(synthetic_slide):
    with open_slide(synthetic_slide) as slide:
        return make_bag(slide, OPTIONS)


@pytest.fixture
def bag_file(tmp_path, made):
    bag, attrs = made
    return write_bag(tmp_path / "synthetic.h5", bag, attrs)


def test_layout_groups_datasets_and_attributes(bag_file, made):
    bag, _ = made
    with h5py.File(bag_file, "r") as f:
        assert f.attrs["format"] == "napari-magnet-bag"
        assert list(f.attrs["levels"]) == ["mpp_8", "mpp_4", "mpp_1"]
        assert f.attrs["mpp_x"] == pytest.approx(0.5)
        assert json.loads(f.attrs["config"]) == OPTIONS.config()
        for name, mpp in (("mpp_8", 8.0), ("mpp_4", 4.0), ("mpp_1", 1.0)):
            group = f[name]
            assert set(group) == {"coords", "parent", "grid", "tissue"}
            coords = group["coords"]
            assert coords.dtype == np.int64 and coords.shape[1] == 2
            a = coords.attrs
            for key in CLAM_COORDS_ATTRS + TRIDENT_COORDS_ATTRS + ("mpp",):
                assert key in a, key
            assert a["patch_size"] == 32
            assert a["mpp"] == mpp
            assert a["target_magnification"] == pytest.approx(10 / mpp)
            assert a["level0_magnification"] == pytest.approx(20.0)
            assert a["patch_size_level0"] == round(32 * mpp / 0.5)
            np.testing.assert_allclose(
                a["patch_size"] * a["downsample"], [a["patch_size_level0"]] * 2
            )
            assert (a["level0_width"], a["level0_height"]) == (4096, 3072)
            assert group["parent"].dtype == np.int64
            assert group["parent"].shape == (coords.shape[0],)
        assert (f["mpp_8/parent"][()] == -1).all()
        # the root coords is the finest grid, for one-magnification readers
        np.testing.assert_array_equal(f["coords"][()], f["mpp_1/coords"][()])
        assert f["coords"].attrs["mpp"] == 1.0


def test_round_trip(bag_file, made):
    bag, _ = made
    back = read_bag(bag_file)
    assert back.source == "napari-magnet"
    assert back.slide_name == "synthetic"
    assert back.level0_size == (4096, 3072)
    assert back.slide_mpp == (0.5, 0.5)
    assert back.mpps == (8.0, 4.0, 1.0)
    for a, b in zip(bag.levels, back.levels):
        assert (a.name, a.extent, a.patch_size, a.mpp, a.patch_level) == (
            b.name,
            b.extent,
            b.patch_size,
            b.mpp,
            b.patch_level,
        )
        assert a.downsample == pytest.approx(b.downsample)
        for key in ("coords", "parent", "grid", "tissue"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
        assert b.features is None
    assert back.level(4).name == "mpp_4"
    with pytest.raises(KeyError):
        back.level(2)
    assert back.levels[0].coords.flags.writeable is False


def test_validation(bag_file, tmp_path):
    assert validate_bag(bag_file) == []
    assert validate_bag(bag_file, OPTIONS.config()) == []
    other = PatchOptions(mpps=(8, 4, 1), patch_size=64).config()
    assert "other settings" in validate_bag(bag_file, other)[0]
    assert validate_bag(tmp_path / "missing.h5")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    assert "not an HDF5" in validate_bag(text)[0]
    cut = tmp_path / "cut.h5"
    cut.write_bytes(bag_file.read_bytes()[:4000])
    assert validate_bag(cut)
    broken = tmp_path / "broken.h5"
    broken.write_bytes(bag_file.read_bytes())
    with h5py.File(broken, "a") as f:
        parent = f["mpp_4/parent"]
        parent[0], parent[-1] = parent[-1], parent[0]
    assert "contiguous" in " ".join(validate_bag(broken))


def test_a_failed_write_leaves_the_old_file(bag_file, made, tmp_path):
    bag, attrs = made
    before = bag_file.read_bytes()
    incomplete = {k: v for k, v in attrs.items() if k != "mpp_1"}
    with pytest.raises(KeyError):
        write_bag(bag_file, bag, incomplete)
    assert bag_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.h5"]


def test_features_are_added_atomically(bag_file, made):
    bag, _ = made
    n8, n1 = len(bag.levels[0]), len(bag.levels[2])
    f8 = np.random.default_rng(0).normal(size=(n8, 16)).astype(np.float16)
    f1 = np.random.default_rng(1).normal(size=(n1, 16)).astype(np.float32)
    add_features(bag_file, {8: f8, 1: f1}, encoder="resnet50_trunc", attrs={"config_hash": "ab"})
    back = read_bag(bag_file)
    np.testing.assert_array_equal(back.level(8).features, f8)
    np.testing.assert_array_equal(back.level(1).features, f1)
    assert back.level(4).features is None
    assert back.level(8).attrs["features_attrs"]["encoder"] == "resnet50_trunc"
    assert back.level(8).attrs["features_attrs"]["config_hash"] == "ab"
    with h5py.File(bag_file, "r") as f:
        np.testing.assert_array_equal(f["features"][()], f1)  # root link: the finest
    assert validate_bag(bag_file) == []
    assert read_bag(bag_file, features=False).level(8).features is None
    with pytest.raises(ValueError):
        add_features(bag_file, {4: np.zeros((3, 16))}, encoder="x")
    np.testing.assert_array_equal(read_bag(bag_file).level(8).features, f8)


# ---- files written by other tools, made by hand from their documented layouts -------------


def _dataset(f, name, data, attrs=None):
    """As those tools create datasets: chunked rows, resizable first axis."""
    data = np.asarray(data)
    dset = f.create_dataset(
        name, data=data, maxshape=(None,) + data.shape[1:], chunks=(1,) + data.shape[1:]
    )
    for key, value in (attrs or {}).items():
        dset.attrs[key] = value
    return dset


COORDS = np.array([[0, 0], [1024, 0], [0, 1024], [2048, 1024]], dtype=np.int64)


def test_clam_patches_file(tmp_path):
    path = tmp_path / "patches" / "slideA.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        _dataset(
            f,
            "coords",
            COORDS,
            {
                "patch_size": 256,
                "patch_level": 1,
                "downsample": np.array([4.0, 4.0]),
                "downsampled_level_dim": np.array([1024, 768]),
                "level_dim": np.array([1024, 768]),
                "name": "slideA",
                "save_path": str(path.parent),
            },
        )
    assert bag_kind(path) == "clam-patches"
    bag = read_bag(path)
    (level,) = bag.levels
    assert bag.source == "clam-patches" and bag.slide_name == "slideA"
    np.testing.assert_array_equal(level.coords, COORDS)
    assert level.extent == (1024.0, 1024.0) and level.patch_level == 1
    assert level.mpp is None and bag.slide_mpp is None
    with_mpp = read_bag(path, slide_mpp=(0.5, 0.5))
    assert with_mpp.levels[0].mpp == pytest.approx(2.0)


def test_clam_features_h5_and_pt(tmp_path):
    feats = np.random.default_rng(2).normal(size=(4, 1024)).astype(np.float32)
    h5 = tmp_path / "h5_files" / "slideB.h5"
    h5.parent.mkdir()
    with h5py.File(h5, "w") as f:  # no attributes at all, int32 coordinates
        _dataset(f, "features", feats)
        _dataset(f, "coords", COORDS.astype(np.int32))
    assert bag_kind(h5) == "clam-features"
    bag = read_bag(h5)
    np.testing.assert_array_equal(bag.levels[0].features, feats)
    np.testing.assert_array_equal(bag.levels[0].coords, COORDS)
    assert bag.levels[0].coords.dtype == np.int64
    assert bag.levels[0].extent == (1024.0, 1024.0)  # the coordinates' grid step
    pt = tmp_path / "pt_files" / "slideB.pt"
    pt.parent.mkdir()
    torch.save(torch.from_numpy(feats), pt)
    from_pt = read_bag(pt)
    assert from_pt.source == "clam-features" and from_pt.path == pt
    np.testing.assert_array_equal(from_pt.levels[0].features, feats)
    np.testing.assert_array_equal(from_pt.levels[0].coords, COORDS)
    lone = tmp_path / "lone.pt"
    torch.save(torch.from_numpy(feats), lone)
    with pytest.raises(BagError, match="twin"):
        read_bag(lone)


def _trident_attrs(name: str, folder: str) -> dict:
    return {
        "patch_size": 256,
        "patch_size_level0": 512,
        "level0_magnification": 20,
        "target_magnification": 10,
        "overlap": 0,
        "name": name,
        "savetodir": folder,
        "level0_width": 4096,
        "level0_height": 3072,
    }


def test_trident_patches_and_features(tmp_path):
    job = tmp_path / "10x_256px_0px_overlap"
    patches = job / "patches" / "slideC_patches.h5"
    patches.parent.mkdir(parents=True)
    attrs = _trident_attrs("slideC", str(job))
    with h5py.File(patches, "w") as f:
        _dataset(f, "coords", COORDS // 2, attrs)
    assert bag_kind(patches) == "trident-patches"
    bag = read_bag(patches)
    (level,) = bag.levels
    assert bag.slide_name == "slideC" and bag.level0_size == (4096, 3072)
    assert level.mpp == pytest.approx(1.0) and bag.slide_mpp == pytest.approx((0.5, 0.5))
    assert level.extent == (512.0, 512.0) and level.patch_size == 256
    assert level.patch_level is None

    feats = np.random.default_rng(3).normal(size=(4, 1536)).astype(np.float32)
    features = job / "features_uni_v1" / "slideC.h5"
    features.parent.mkdir()
    with h5py.File(features, "w") as f:
        _dataset(f, "features", feats, {"name": "slideC", "savetodir": "None", "encoder": "uni_v1"})
        _dataset(f, "coords", COORDS // 2, attrs)
    assert bag_kind(features) == "trident-features"
    bag = read_bag(features)
    np.testing.assert_array_equal(bag.levels[0].features, feats)
    fa = bag.levels[0].attrs["features_attrs"]
    assert fa["encoder"] == "uni_v1" and fa["savetodir"] is None


def test_our_file_reads_like_a_clam_or_trident_coords_file(bag_file):
    """What those tools read from ``f['coords']`` is there, consistent, in level-0 pixels."""
    with h5py.File(bag_file, "r") as f:
        attrs = dict(f["coords"].attrs)
        coords = f["coords"][()]
    src_mpp = 10 / attrs["level0_magnification"]
    dst_mpp = 10 / attrs["target_magnification"]
    assert round(attrs["patch_size"] * dst_mpp / src_mpp) == attrs["patch_size_level0"]
    assert coords.max(axis=0)[0] < attrs["level0_width"]
    assert isinstance(int(attrs["patch_level"]), int)


def test_files_that_are_not_bags(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 8, 8)))
    text = tmp_path / "text.h5"
    text.write_text("hello")
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as f:
        f.create_dataset("coords", data=np.zeros(5))
    for path in (other, text, flat):
        assert bag_kind(path) is None
        with pytest.raises(BagError):
            read_bag(path)
    with pytest.raises(BagError, match="not found"):
        read_bag(tmp_path / "missing.h5")
