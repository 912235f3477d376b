"""Every file in ../shared/testdata/wsi behaves as its row in SOURCES.md says."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet.slide import SlideError, is_slide, open_slide

from ..conftest import wsi

OPENS = {
    # name: (vendor, level count, level-0 (w, h), mpp_x or None)
    "CMU-1-Small-Region.svs": ("aperio", 1, (2220, 2967), 0.499),
    "hamamatsu_fluorescence_DAPI.ndpi": ("hamamatsu", 7, (3968, 4864), 0.2282),
    "camelyon16_multiframe_jpeg.dcm": ("dicom", 1, (1152, 700), 28.97),
    "boxes.tiff": ("generic-tiff", 4, (300, 250), None),
    "small.svs": ("aperio", 1, (16, 16), 0.499),
    "boxes_0.dcm": ("dicom", 1, (16, 16), 0.499),
    "boxes_1.dcm": ("dicom", 1, (16, 16), 0.499),
    "highdicom_sm_image.dcm": ("dicom", 1, (50, 50), 0.499),
}

FAILS = {
    "unreadable.svs": "cannot be decoded",
    "unopenable.tiff": "52479",
    "broken.svs": "not a slide",
    "highdicom_sm_image_grayscale.dcm": "BitsAllocated",
}


@pytest.mark.parametrize("name", sorted(OPENS))
def test_good_files_open_with_their_geometry(name):
    vendor, levels, dims, mpp_x = OPENS[name]
    with open_slide(wsi(name)) as slide:
        assert slide.vendor == vendor
        assert slide.level_count == levels
        assert slide.dimensions == dims
        if mpp_x is not None:
            assert slide.mpp[0] == pytest.approx(mpp_x, rel=1e-3)
        region = slide.read_region((0, 0), slide.level_count - 1, (8, 8))
        assert region.shape == (8, 8, 3) and region.dtype == np.uint8
        assert slide.name == wsi(name).stem


def test_cmu_metadata_and_associated_images(cmu_path):
    with open_slide(cmu_path) as slide:
        meta = slide.metadata()
        assert meta["units"] == "µm"
        assert meta["objective_power"] == 20
        assert set(meta["associated_images"]) == {"label", "macro", "thumbnail"}
        assert meta["properties"]["openslide.vendor"] == "aperio"
        label = slide.associated_images["label"]
        assert label.ndim == 3 and label.shape[2] == 3 and label.dtype == np.uint8


def test_ndpi_has_all_seven_levels(ndpi_path):
    with open_slide(ndpi_path) as slide:
        assert slide.level_dimensions[-1] == (62, 76)
        assert slide.level_downsamples == pytest.approx((1, 2, 4, 8, 16, 32, 64))


def test_boxes_float_downsamples(boxes_path):
    with open_slide(boxes_path) as slide:
        assert slide.level_downsamples[2] == pytest.approx(4.016, abs=1e-3)
        assert slide.level_downsamples[3] == pytest.approx(8.086, abs=1e-3)


@pytest.mark.parametrize("name", sorted(FAILS))
def test_bad_files_raise_one_clear_error(name):
    with pytest.raises(SlideError) as info:
        open_slide(wsi(name))
    message = str(info.value)
    assert name in message
    assert FAILS[name] in message


def test_non_slides_are_recognised_as_such(tmp_path):
    assert not is_slide(wsi("broken.svs"))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert not is_slide(text)
    assert not is_slide(tmp_path / "missing.svs")
    assert is_slide(wsi("CMU-1-Small-Region.svs"))


def test_dicom_folder_opens_as_one_slide(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        (folder / name).write_bytes(wsi(name).read_bytes())
    assert is_slide(folder)
    with open_slide(folder) as slide:
        assert slide.vendor == "dicom"
        assert slide.dimensions == (16, 16)
        assert slide.name == "dicom"
