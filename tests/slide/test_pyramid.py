"""The lazy pyramid agrees with OpenSlide pixel for pixel, under threads, with a bounded cache."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import dask.array as da
import numpy as np
import openslide
import pytest
import tifffile

from napari_magnet.slide import SlideError, open_slide
from napari_magnet.slide.backends import OpenSlideBackend

from ..conftest import wsi


def exact_level_offsets(length: int, downsample: float) -> np.ndarray:
    """Level positions whose level-0 position is an integer (OpenSlide resamples otherwise)."""
    positions = np.arange(length)
    level0 = positions * downsample
    return positions[np.abs(level0 - np.rint(level0)) < 1e-6]


def random_windows(rng, slide, level, count=12):
    """Windows at exact offsets, including tile edges and the last partial tile."""
    width, height = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    xs = exact_level_offsets(width, ds)
    ys = exact_level_offsets(height, ds)
    tile_w, tile_h = slide.tile_sizes[level]
    wanted_x = [width - 1, (tile_w - 3) if 0 < tile_w < width else 0]
    wanted_y = [height - 1, (tile_h - 3) if 0 < tile_h < height else 0]
    windows = []
    for x, y in zip(wanted_x + list(rng.choice(xs, count)), wanted_y + list(rng.choice(ys, count))):
        x = int(xs[np.abs(xs - x).argmin()])
        y = int(ys[np.abs(ys - y).argmin()])
        w = int(rng.integers(1, min(300, width - x) + 1))
        h = int(rng.integers(1, min(300, height - y) + 1))
        windows.append((x, y, w, h))
    return windows


@pytest.mark.parametrize(
    "name",
    [
        "boxes.tiff",
        "hamamatsu_fluorescence_DAPI.ndpi",
        "CMU-1-Small-Region.svs",
        "camelyon16_multiframe_jpeg.dcm",
    ],
)
def test_every_level_matches_openslide_read_region(name):
    path = wsi(name)
    rng = np.random.default_rng(7)
    osr = openslide.OpenSlide(str(path))
    with open_slide(path) as slide:
        for level in range(slide.level_count):
            ds = slide.level_downsamples[level]
            array = slide.pyramid[level]
            for x, y, w, h in random_windows(rng, slide, level):
                ours = np.asarray(array[y : y + h, x : x + w])
                location = (int(round(x * ds)), int(round(y * ds)))
                theirs = np.asarray(osr.read_region(location, level, (w, h)))[..., :3]
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} L{level} {x},{y}")
                np.testing.assert_array_equal(slide.read_region(location, level, (w, h)), theirs)


def test_boxes_levels_equal_tifffile_whole_level_decode(boxes_path):
    with open_slide(boxes_path) as slide, tifffile.TiffFile(boxes_path) as tif:
        assert slide.backend_name == "tifffile"
        for level, series in enumerate(tif.series[0].levels):
            np.testing.assert_array_equal(slide.pyramid[level].compute(), series.asarray())


def test_fast_path_equals_openslide_path_on_cmu(cmu_path):
    with open_slide(cmu_path) as fast, open_slide(cmu_path, backend="openslide") as reference:
        assert fast.backend_name == "tifffile" and reference.backend_name == "openslide"
        whole = reference.pyramid[0].compute()
        np.testing.assert_array_equal(fast.pyramid[0].compute(), whole)
        # Windows spanning many chunks, starting on and off the chunk grid.
        np.testing.assert_array_equal(fast.read_level(0, 0, 0, 2220, 2967), whole)
        np.testing.assert_array_equal(
            fast.read_level(0, 720, 0, 1500, 1000), whole[:1000, 720:2220]
        )
        np.testing.assert_array_equal(fast.read_level(0, 5, 7, 1000, 900), whole[7:907, 5:1005])


def test_units_and_chunks_follow_the_tile_grid(cmu_path, ndpi_path):
    with open_slide(cmu_path) as slide:
        tile = slide.tile_sizes[0][0]
        assert tile == 240
        reader = slide._readers[0]
        assert (reader.unit_w, reader.unit_h) == (240, 240)  # a tile per cache unit
        assert slide.pyramid[0].chunksize[0] % tile == 0 and slide.pyramid[0].chunksize[0] >= 1024
        assert isinstance(slide.pyramid[0], da.Array)
    with open_slide(ndpi_path) as slide:
        # NDPI's tiles are restart intervals as wide as the level and 8 rows high: a unit
        # stacks 16 of them, a dask chunk 8 units.
        reader = slide._readers[0]
        assert (reader.unit_w, reader.unit_h) == (3968, 128)
        assert slide.pyramid[0].chunksize[:2] == (1024, 3968)
        # OpenSlide's own levels (4-6): its tiles (248 x 4 at level 4) stacked to 128 rows.
        assert (slide._readers[4].unit_w, slide._readers[4].unit_h) == (248, 128)


def test_reads_outside_the_slide_are_background(cmu_path):
    with open_slide(cmu_path) as slide:
        w, h = slide.dimensions
        patch = slide.read_region((w - 10, h - 10), 0, (20, 20))
        assert (patch[10:, :] == 255).all() and (patch[:, 10:] == 255).all()
        assert not (patch[:10, :10] == 255).all()


def test_many_threads_agree_with_a_single_thread(ndpi_path, cmu_path):
    for path in (ndpi_path, cmu_path):
        rng = np.random.default_rng(3)
        with open_slide(path, cache_bytes=8 * 2**20) as reference:
            expected = {}
            jobs = []
            for _ in range(200):
                level = int(rng.integers(0, reference.level_count))
                w, h = reference.level_dimensions[level]
                x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
                jobs.append((level, x, y, int(rng.integers(1, 400)), int(rng.integers(1, 400))))
            for job in jobs:
                expected[job] = reference.read_level(*job)
        with open_slide(path, cache_bytes=8 * 2**20) as shared:
            with ThreadPoolExecutor(max_workers=16) as pool:
                results = list(pool.map(lambda job: shared.read_level(*job), jobs * 3))
            for job, result in zip(jobs * 3, results):
                np.testing.assert_array_equal(result, expected[job])


def test_cache_is_bounded_and_shared_across_levels(ndpi_path):
    budget = 3 * 512 * 512 * 3
    with open_slide(ndpi_path, cache_bytes=budget) as slide:
        for level in range(slide.level_count):
            slide.pyramid[level].compute()
            assert slide.cache.nbytes <= budget
        misses = slide.cache.misses
        slide.pyramid[-1].compute()  # smallest level was read last: still cached
        assert slide.cache.misses == misses
        assert slide.cache.hits > 0


def test_broken_handle_is_reopened_not_retried(tmp_path, cmu_path):
    """Corrupt one tile: reading it fails clearly, reading elsewhere afterwards still works."""
    damaged = tmp_path / "damaged.svs"
    shutil.copy(cmu_path, damaged)
    with tifffile.TiffFile(damaged) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[0], page.databytecounts[0]
    with open(damaged, "r+b") as fh:
        fh.seek(offset + 2)
        fh.write(b"\xff\x00" * (count // 2 - 2))
    backend = OpenSlideBackend(damaged, (255, 255, 255))
    with pytest.raises(SlideError, match="damaged.svs: pixels cannot be decoded"):
        backend.read_level(0, 0, 0, 64, 64)
    # A plain OpenSlide handle stays in its error state after such a failure.
    osr = openslide.OpenSlide(str(damaged))
    with pytest.raises(openslide.OpenSlideError):
        osr.read_region((0, 0), 0, (64, 64))
    with pytest.raises(openslide.OpenSlideError):
        osr.read_region((1000, 1000), 0, (64, 64))
    good = backend.read_level(0, 1000, 1000, 64, 64)
    reference = np.asarray(
        openslide.OpenSlide(str(cmu_path)).read_region((1000, 1000), 0, (64, 64))
    )[..., :3]
    np.testing.assert_array_equal(good, reference)
    backend.close()


def test_level_slices_carry_only_the_chunks_they_touch(cmu_path):
    with open_slide(cmu_path) as slide:
        level0 = slide.pyramid[0]
        whole = slide.read_level(0, 0, 0, *slide.dimensions)
        assert level0.npartitions == 2 * 3
        window = level0[1300:1900, 1000:1100]
        # 1 x 1 chunk touched: the graph holds that read, not the level's six.
        assert len(dict(window.__dask_graph__())) == 1
        np.testing.assert_array_equal(np.asarray(window), whole[1300:1900, 1000:1100])
        np.testing.assert_array_equal(window.compute(), whole[1300:1900, 1000:1100])
        np.testing.assert_array_equal(np.asarray(level0[5:9, 7:8, 1]), whole[5:9, 7:8, 1])
        np.testing.assert_array_equal(np.asarray(level0[::97, ::101]), whole[::97, ::101])
        np.testing.assert_array_equal(np.asarray(level0[-20:, -30:]), whole[-20:, -30:])
        assert int(level0[100:200, 100:300].sum().compute()) == int(whole[100:200, 100:300].sum())
