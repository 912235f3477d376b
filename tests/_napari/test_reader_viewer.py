"""A real napari viewer under Xvfb opens slides through the plugin."""

from __future__ import annotations

import numpy as np
import pytest

from napari_magnet._napari.reader import get_reader
from napari_magnet.slide import SlideError

from ..conftest import wsi


def test_reader_declines_files_that_are_not_slides(tmp_path):
    text = tmp_path / "notes.tiff"
    text.write_text("not an image")
    assert get_reader(str(text)) is None
    assert get_reader(str(wsi("broken.svs"))) is None
    assert get_reader([str(wsi("CMU-1-Small-Region.svs")), str(text)]) is None
    assert callable(get_reader(str(wsi("CMU-1-Small-Region.svs"))))


def test_viewer_opens_cmu_slide_in_micrometres_and_renders_tissue(make_napari_viewer, cmu_path):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(cmu_path), plugin="napari-magnet")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.name == "CMU-1-Small-Region"
    assert layer.rgb
    assert tuple(layer.scale) == pytest.approx((0.499, 0.499))
    assert [str(u) for u in layer.units] == ["micrometer", "micrometer"]
    assert layer.metadata["vendor"] == "aperio"
    assert layer.metadata["slide"].dimensions == (2220, 2967)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = shot[..., :3].astype(int)
    # Tissue: H&E pink/purple pixels (red and blue above green), neither black nor blank.
    tissue = (rgb[..., 0] - rgb[..., 1] > 25) & (rgb[..., 2] - rgb[..., 1] > 10)
    assert tissue.mean() > 0.05, f"only {tissue.mean():.3f} of the canvas looks like tissue"
    assert rgb.std() > 10


def test_multiscale_ndpi_layer(make_napari_viewer, ndpi_path):
    viewer = make_napari_viewer(show=True)
    (layer,) = viewer.open(str(ndpi_path), plugin="napari-magnet")
    assert layer.multiscale
    assert len(layer.data) == 7
    assert layer.data[0].shape == (4864, 3968, 3)


@pytest.mark.parametrize(
    "name", ["unreadable.svs", "unopenable.tiff", "highdicom_sm_image_grayscale.dcm"]
)
def test_bad_slide_raises_clear_error_and_viewer_keeps_working(make_napari_viewer, name, cmu_path):
    viewer = make_napari_viewer(show=True)
    with pytest.raises(Exception) as info:
        viewer.open(str(wsi(name)), plugin="napari-magnet")
    error = info.value
    chain = [error, error.__cause__, error.__context__]
    assert any(isinstance(e, SlideError) for e in chain), repr(error)
    assert name in str(error) or any(name in str(e) for e in chain if e is not None)
    assert len(viewer.layers) == 0
    (layer,) = viewer.open(str(cmu_path), plugin="napari-magnet")
    assert np.asarray(layer.data[100:110, 100:110]).shape == (10, 10, 3)
