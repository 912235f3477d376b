"""The region reader renders level-0 regions from the level they need."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_magnet.engine.frames import slide_frame
from napari_magnet.engine.regions import RegionReader
from napari_magnet.slide import open_slide


def test_layer_one_is_the_slide_resized_and_black_padded(cmu_path):
    with open_slide(cmu_path) as slide, RegionReader(slide) as reader:
        frame, visible = slide_frame(slide)
        batch = reader.read(frame, 56, visible)
        image = batch.images[0]
        # 2220 x 2967: width renders as 56 * 2220 / 2967 = 41.9 px, centred → ~7 black columns.
        assert (image[:, :6] == 0).all() and (image[:, -6:] == 0).all()
        assert (image[:, 8:-8] > 0).any(axis=-1).all()
        assert batch.levels.tolist() == [0]
        assert batch.pixels_read == 2220 * 2967 * 3


def test_rendering_matches_a_direct_downscale(cmu_path):
    """A region read at 112 equals the level-0 crop area-averaged by the same factor."""
    with open_slide(cmu_path) as slide, RegionReader(slide) as reader:
        frame = np.array([[400.0, 800.0, 400.0 + 448, 800.0 + 448]])
        batch = reader.read(frame, 112)
        crop = slide.read_region((400, 800), 0, (448, 448))
        expected = F.avg_pool2d(torch.from_numpy(crop).permute(2, 0, 1)[None].float(), 4)
        expected = expected[0].permute(1, 2, 0).round().numpy()
        assert np.abs(batch.images[0].astype(float) - expected).max() <= 1


def test_regions_are_read_from_the_coarsest_sufficient_level(ndpi_path):
    with open_slide(ndpi_path) as slide, RegionReader(slide) as reader:
        frame, visible = slide_frame(slide)
        assert reader.read(frame, 112, visible).levels.tolist() == [5]
        small = np.array([[1000.0, 1000.0, 1100.0, 1100.0]])
        assert reader.read(small, 112).levels.tolist() == [0]
        paper = RegionReader(slide, rule="paper")
        assert paper.read(frame, 112, visible).levels.tolist() == [6]
        paper.close()


def test_parallel_reads_equal_serial_reads(cmu_path):
    rng = np.random.default_rng(0)
    x0 = rng.uniform(0, 1800, 24)
    y0 = rng.uniform(0, 2500, 24)
    side = rng.uniform(20, 900, 24)
    frames = np.stack([x0, y0, x0 + side, y0 + side], axis=1)
    with open_slide(cmu_path) as slide:
        with RegionReader(slide, workers=8) as parallel, RegionReader(slide, workers=1) as serial:
            np.testing.assert_array_equal(
                parallel.read(frames, 56).images, serial.read(frames, 56).images
            )


def test_bad_parameters_are_rejected(cmu_path):
    with open_slide(cmu_path) as slide:
        with pytest.raises(ValueError, match="unknown level rule"):
            RegionReader(slide, rule="closest")
        with RegionReader(slide) as reader, pytest.raises(ValueError, match="positive"):
            reader.read(np.array([[0, 0, 10, 10.0]]), 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_read_resampled_on_the_gpu_equals_the_cpu_read(cmu_path):
    """Training resamples its region reads on the GPU (only the decoded window crosses)."""
    rng = np.random.default_rng(2)
    with open_slide(cmu_path) as slide, RegionReader(slide) as reader:
        width, height = slide.dimensions
        sides = rng.uniform(200, 1500, 12)
        x0 = rng.uniform(-200, width - 100, 12)
        y0 = rng.uniform(-200, height - 100, 12)
        frames = np.stack([x0, y0, x0 + sides, y0 + sides], axis=1)
        visible = np.tile([0.0, 0.0, float(width), float(height)], (12, 1))
        cpu = reader.read(frames, 224, visible)
        gpu = reader.read(frames, 224, visible, device="cuda")
        assert gpu.pixels.device.type == "cuda" and reader.device.type == "cpu"
        assert (gpu.levels == cpu.levels).all() and gpu.pixels_read == cpu.pixels_read
        diff = (gpu.pixels.cpu().int() - cpu.pixels.int()).abs()
        assert diff.max() <= 1  # float rounding of the same area average


@pytest.mark.parametrize("slide_fixture", ["cmu_path", "ndpi_path"])
def test_regions_on_whole_pixels_are_cropped_to_the_values_roi_align_gives(
    slide_fixture, request, monkeypatch
):
    """Patches on a level's own grid (1:1, or an integer area-average) skip the resampling;
    the values are roi_align's exactly, at the slide's edge and inside it. A patch off the
    grid by a fraction of a pixel takes the nearest pixels."""
    import napari_magnet.engine.regions as regions

    path = request.getfixturevalue(slide_fixture)
    with open_slide(path) as slide:
        width, height = slide.dimensions
        frames = [
            [0.0, 0.0, 64.0, 64.0],  # 1:1 at level 0
            [128.0, 256.0, 256.0, 384.0],  # 2:1 at level 0 (or 1:1 higher up)
            [96.0, 32.0, 352.0, 288.0],  # 4:1
            [width - 64.0, height - 64.0, width + 64.0, height + 64.0],  # past the corner
            [300.0, 400.0, 492.0, 592.0],  # 3:1
        ]
        frames = np.asarray(frames)
        crops = []
        for size in (64, 32):
            with RegionReader(slide, workers=1) as reader:
                crops.append(reader.read(frames, size).images)
                # off the grid by a fraction of a pixel: each output pixel's nearest one
                (off,) = reader.read(np.array([[10.5, 20.25, 74.5, 84.25]]), 64).images
                np.testing.assert_array_equal(off, slide.read_level(0, 11, 20, 64, 64))
        monkeypatch.setattr(regions, "_source_pixels", lambda *args: None)
        for size, fast in zip((64, 32), crops):
            with RegionReader(slide, workers=1) as reader:
                np.testing.assert_array_equal(fast, reader.read(frames, size).images)


def test_the_source_pixels_of_a_box():
    from napari_magnet.engine.regions import _source_pixels

    pick = _source_pixels((2.0, 3.0, 66.0, 67.0), 64, 64, (100, 100))
    assert pick == (slice(2, 66), slice(3, 67))  # whole pixels: a crop
    assert _source_pixels((2.5, 3.0, 66.5, 67.0), 64, 64, (100, 100)) == (
        slice(3, 67),  # half a pixel off: the nearest pixels
        slice(3, 67),
    )
    assert _source_pixels((2.0, 3.0, 66.0, 67.0), 32, 32, (100, 100)) is None  # resampled
    assert _source_pixels((40.0, 3.0, 104.0, 67.0), 64, 64, (100, 100)) is None  # past the source
    # 64.9 pixels for 64 outputs: within one pixel of drift, one column repeated... skipped
    columns, rows = _source_pixels((0.0, 0.0, 64.9, 64.0), 64, 64, (100, 100))
    assert rows == slice(0, 64) and isinstance(columns, np.ndarray)
    assert len(columns) == 64 and columns[0] == 0 and columns[-1] == 64
    assert set(np.diff(columns)) == {1, 2}  # one source column skipped, none repeated
    assert _source_pixels((0.0, 0.0, 65.1, 64.0), 64, 64, (100, 100)) is None  # 1.1 px drift


def test_near_one_downscales_take_one_sample_per_pixel(cmu_path):
    from napari_magnet.engine.regions import _samples_per_side

    assert [_samples_per_side(r) for r in (0.5, 1.0, 1.002, 1.02, 1.5, 2.0, 3.2)] == [
        1,
        1,
        1,
        1,
        2,
        2,
        4,
    ]
    # a 224-px patch at 0.5 µm/px of this 0.499 µm/px slide, on tissue, spans 224.4 pixels:
    # within a pixel of drift, so it is the slide's own pixels (2 x 2 samples blurred it over
    # half a pixel: ~5 grey levels off); 230 pixels for 224 are resampled, one sample each
    with open_slide(cmu_path) as slide, RegionReader(slide, workers=1) as reader:
        frame = np.array([[1000.0, 1500.0, 1000.0 + 224.4, 1500.0 + 224.4]])
        patch = reader.read(frame, 224).images[0].astype(float)
        crop = slide.read_region((1000, 1500), 0, (224, 224)).astype(float)
        wider = np.array([[1000.0, 1500.0, 1000.0 + 230.0, 1500.0 + 230.0]])
        resampled = reader.read(wider, 224).images[0].astype(float)
    assert crop[:32, :32].std() > 20  # tissue, not glass
    np.testing.assert_array_equal(patch, crop)
    assert not np.array_equal(resampled, crop)  # 6 pixels of drift: resampled
