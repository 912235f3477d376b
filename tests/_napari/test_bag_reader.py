"""Bag files open in a real napari viewer as one patch-grid layer per magnification, in µm."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from napari_magnet._napari.bag_reader import get_bag_reader, level_layer_data, read_bag_layers
from napari_magnet._napari.layers import layer_kind
from napari_magnet.bags import PatchOptions, patch_slide, read_bag


@pytest.fixture
def slide_and_bag(tmp_path, cmu_path):
    """The CMU slide copied into a folder with its bag file beside it."""
    slide = tmp_path / cmu_path.name
    shutil.copyfile(cmu_path, slide)
    bag = tmp_path / "CMU-1-Small-Region.h5"
    outcome = patch_slide(slide, bag, PatchOptions((8, 4, 1), 64))
    assert outcome.status == "written", outcome.reason
    return slide, bag


def test_reader_declines_files_that_are_not_bags(tmp_path, slide_and_bag):
    _, bag = slide_and_bag
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    other = tmp_path / "images.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4)))
    assert get_bag_reader(str(text)) is None
    assert get_bag_reader(str(other)) is None
    assert get_bag_reader(str(tmp_path / "missing.h5")) is None
    assert get_bag_reader(str(slide_and_bag[0])) is None
    assert get_bag_reader([str(bag), str(bag)]) is None
    assert get_bag_reader(str(bag)) is read_bag_layers
    assert get_bag_reader([str(bag)]) is read_bag_layers


def test_viewer_shows_each_magnification_over_its_slide(make_napari_viewer, slide_and_bag):
    slide_path, bag_path = slide_and_bag
    viewer = make_napari_viewer(show=True)
    (slide_layer,) = viewer.open(str(slide_path), plugin="napari-magnet")
    layers = viewer.open(str(bag_path), plugin="napari-magnet")
    bag = read_bag(bag_path)
    assert [lyr.name for lyr in layers] == [
        f"CMU-1-Small-Region · {m:g} µm/px patches ({len(lv)})"
        for m, lv in zip((8, 4, 1), bag.levels)
    ]
    mpp = 0.499
    for layer, level in zip(layers, bag.levels):
        assert layer_kind(layer) == "bag"
        assert layer.metadata["slide_path"] == str(slide_path)
        assert layer.metadata["mpp"] == (mpp, mpp)
        assert type(layer).__name__ == "Shapes" and layer.nshapes == len(level)
        assert set(layer.shape_type) == {"rectangle"}
        # world (row, col) in µm: the first patch's top-left and size
        corners = np.asarray(layer.data[0])
        x0, y0 = level.coords[0]
        assert corners.min(axis=0) == pytest.approx([y0 * mpp, x0 * mpp])
        assert np.ptp(corners, axis=0) == pytest.approx([level.extent[1] * mpp] * 2)
        np.testing.assert_array_equal(layer.features["parent"], level.parent)
        np.testing.assert_allclose(layer.features["tissue"], level.tissue)
    # the grids lie over the slide layer, which is shown in µm too
    slide_extent = np.asarray(slide_layer.extent.world)
    grid_extent = np.asarray(layers[-1].extent.world)
    assert (grid_extent[0] >= slide_extent[0] - 1).all()
    assert grid_extent[0] == pytest.approx(
        [bag.levels[-1].coords[:, 1].min() * mpp, bag.levels[-1].coords[:, 0].min() * mpp]
    )
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    pink = (shot[..., 0] > 200) & (shot[..., 1] < 120) & (shot[..., 2] > 100)
    assert pink.sum() > 50, "the finest grid's outlines are drawn"


def test_many_patches_become_points(make_napari_viewer, slide_and_bag):
    _, bag_path = slide_and_bag
    bag = read_bag(bag_path, features=False)
    level = bag.levels[-1]
    data, kwargs, kind = level_layer_data(bag, level, 2, bag.slide_mpp, max_shapes=10)
    assert kind == "points"
    viewer = make_napari_viewer()
    layer = viewer.add_points(data, **kwargs)
    assert len(layer.data) == len(level)
    centre = (level.coords[0] + np.asarray(level.extent) / 2) * 0.499
    assert layer.data[0] == pytest.approx(centre[::-1])
    assert layer.size[0] == pytest.approx(level.extent[0] * 0.499)
    assert layer.metadata["napari_magnet"]["representation"] == "points"


def test_trident_coords_beside_the_slide_use_the_slides_pixel_size(
    make_napari_viewer, tmp_path, cmu_path
):
    """TRIDENT's file says 20x (0.5 µm); the slide beside it says 0.499: the slide wins."""
    shutil.copyfile(cmu_path, tmp_path / cmu_path.name)
    patches = tmp_path / "10x_256px_0px_overlap" / "patches" / "CMU-1-Small-Region_patches.h5"
    patches.parent.mkdir(parents=True)
    coords = np.array([[0, 0], [512, 0], [0, 512]], dtype=np.int64)
    with h5py.File(patches, "w") as f:
        dset = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(1, 2))
        dset.attrs.update(
            {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 20,
                "target_magnification": 10,
                "overlap": 0,
                "name": "CMU-1-Small-Region",
                "savetodir": str(patches.parent.parent),
                "level0_width": 2220,
                "level0_height": 2967,
            }
        )
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(patches), plugin="napari-magnet")
    assert layer.metadata["mpp"] == (0.499, 0.499)
    assert layer.metadata["slide_path"].endswith("CMU-1-Small-Region.svs")
    assert layer.name == "CMU-1-Small-Region · 1 µm/px patches (3)"
    assert np.asarray(layer.data[1]).max(axis=0) == pytest.approx([512 * 0.499, 1024 * 0.499])
