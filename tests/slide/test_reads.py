"""Viewport reads: parallel decoding, the cache of units and parts, and napari's read path.

Every read is compared with OpenSlide's ``read_region`` of the same window, on generated
JPEG tiled TIFFs (small, written here with tifffile) and on the real files.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import dask
import numpy as np
import openslide
import pytest
import tifffile

from napari_magnet.slide import SlideError, open_slide
from napari_magnet.slide.parallel import run_all
from napari_magnet.slide.pyramid import UnitPart, WindowArray

from ..conftest import wsi


def write_pyramid(path, width=2600, height=1800, tile=256, levels=3, photometric="rgb", ome=False):
    """A JPEG tiled TIFF pyramid with texture everywhere (no two tiles alike)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
    image = (image + rng.integers(-20, 20, image.shape)).clip(0, 255).astype(np.uint8)
    options = dict(tile=(tile, tile), compression="jpeg", photometric=photometric)
    with tifffile.TiffWriter(path, ome=ome) as tw:
        if ome:
            tw.write(image, subifds=levels - 1, metadata={"axes": "YXS"}, **options)
        else:
            tw.write(image, **options)
        for k in range(1, levels):
            tw.write(image[:: 2**k, :: 2**k], subfiletype=1, **options)
    return path


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory):
    """One generated pyramid per JPEG colour space, written once for the module."""
    folder = tmp_path_factory.mktemp("reads")
    return {p: write_pyramid(folder / f"{p}.tif", photometric=p) for p in ("rgb", "ycbcr")}


@pytest.fixture
def pyramid_path(pyramids):
    return pyramids["ycbcr"]


def reference(path, level, x, y, w, h):
    """OpenSlide's pixels of a level window (level coordinates, integer downsamples)."""
    with openslide.OpenSlide(str(path)) as osr:
        ds = osr.level_downsamples[level]
        image = osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return np.asarray(image)[..., :3]


VIEWPORTS = [(0, 0, 1920, 1080), (311, 97, 1920, 1080), (680, 720, 1920, 1080), (5, 5, 700, 300)]


@pytest.mark.parametrize("backend", ["auto", "openslide"])
@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_viewports_cold_and_warm_equal_openslide(pyramids, backend, photometric):
    path = pyramids[photometric]
    with open_slide(path, backend=backend) as slide:
        assert slide.backend_name == ("tifffile" if backend == "auto" else "openslide")
        level0 = slide.pyramid[0]
        for x, y, w, h in VIEWPORTS:
            expected = reference(path, 0, x, y, w, h)
            window = level0[y : y + h, x : x + w, :]
            assert isinstance(window, WindowArray)
            np.testing.assert_array_equal(np.asarray(window), expected)  # cold
            misses = slide.cache.misses
            np.testing.assert_array_equal(np.asarray(window[:, :]), expected)  # warm
            assert slide.cache.misses == misses
            np.testing.assert_array_equal(window.compute(), expected)
            np.testing.assert_array_equal(
                np.asarray(window[10:20, 30:50, 1:]), expected[10:20, 30:50, 1:]
            )
        for level in (1, 2):
            w, h = slide.level_dimensions[level]
            np.testing.assert_array_equal(
                np.asarray(slide.pyramid[level]), reference(path, level, 0, 0, w, h)
            )


def test_openslide_cold_read_asks_for_the_window_only(pyramid_path):
    """OpenSlide composites every pixel it returns: a cold read asks for the window's pixels,
    in parallel pieces, and keeps the cut units as parts."""
    with open_slide(pyramid_path, backend="openslide") as slide:
        backend = slide._readers[0].backend
        asked = []
        original = backend.read_level

        def counting(level, x, y, w, h):
            asked.append(w * h)
            return original(level, x, y, w, h)

        backend.read_level = counting
        x, y, w, h = 300, 200, 1920, 1080
        np.asarray(slide.pyramid[0][y : y + h, x : x + w])
        assert sum(asked) == w * h and len(asked) > 1
        parts = [v for v in slide.cache._items.values() if isinstance(v, UnitPart)]
        assert parts  # the edge units are cached in part
        # Panning right by 100 px: only the newly needed pixels and the cut units are read.
        asked.clear()
        expected = reference(pyramid_path, 0, x + 100, y, w, h)
        np.testing.assert_array_equal(slide.read_level(0, x + 100, y, w, h), expected)
        assert 0 < sum(asked) < w * h // 2
        # Panning back: everything is cached.
        asked.clear()
        np.testing.assert_array_equal(
            slide.read_level(0, x, y, w, h), reference(pyramid_path, 0, x, y, w, h)
        )
        assert asked == []


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_cache_bound_holds_for_viewports(pyramid_path, backend):
    budget = 3 * 2**20
    rng = np.random.default_rng(5)
    with open_slide(pyramid_path, cache_bytes=budget, backend=backend) as slide:
        for _ in range(12):
            x, y = int(rng.integers(0, 2600 - 1000)), int(rng.integers(0, 1800 - 600))
            got = slide.read_level(0, x, y, 1000, 600)
            np.testing.assert_array_equal(got, reference(pyramid_path, 0, x, y, 1000, 600))
            assert slide.cache.nbytes <= budget
            assert slide.cache.nbytes == sum(v.nbytes for v in slide.cache._items.values())


@pytest.mark.parametrize("backend", ["auto", "openslide"])
def test_concurrent_viewports_agree(pyramid_path, backend):
    rng = np.random.default_rng(9)
    jobs = []
    for _ in range(40):
        w, h = int(rng.integers(1, 1500)), int(rng.integers(1, 900))
        jobs.append((int(rng.integers(0, 2600 - w)), int(rng.integers(0, 1800 - h)), w, h))
    expected = {job: reference(pyramid_path, 0, *job) for job in jobs}
    with open_slide(pyramid_path, cache_bytes=6 * 2**20, backend=backend) as slide:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda job: slide.read_level(0, *job), jobs * 3))
    for job, result in zip(jobs * 3, results):
        np.testing.assert_array_equal(result, expected[job])


def test_napari_read_path_skips_the_scheduler(pyramid_path):
    """``np.asarray`` of a level or a slice reads the window directly; ``compute`` runs the
    graph."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dask scheduler ran")

    with open_slide(pyramid_path) as slide:
        window = slide.pyramid[0][100:1180, 200:2120]
        with dask.config.set(scheduler=refuse):
            data = np.asarray(window[(slice(None), slice(None))])
            thumbnail = np.asarray(slide.pyramid[-1][(slice(None), slice(None))])
            np.testing.assert_array_equal(np.asarray(slide.pyramid[-1]), thumbnail)
        np.testing.assert_array_equal(data, window.compute(scheduler="sync"))
        assert thumbnail.shape == (450, 650, 3)
        assert np.asarray(window, dtype=np.float32).dtype == np.float32


def test_run_all_runs_each_job_once_and_raises_the_error():
    seen, lock = [], threading.Lock()

    def job(i):
        def run():
            with lock:
                seen.append(i)

        return run

    run_all([job(i) for i in range(50)])
    assert sorted(seen) == list(range(50))

    def broken():
        raise SlideError("x.svs", "pixels cannot be decoded: boom")

    with pytest.raises(SlideError, match="boom"):
        run_all([job(0), broken, job(1)])


def test_unreadable_tiles_raise_one_clear_error_from_the_pool():
    with pytest.raises(SlideError, match="unreadable.svs: pixels cannot be decoded"):
        with open_slide(wsi("unreadable.svs")) as slide:
            slide.read_level(0, 0, 0, *slide.dimensions)


def test_ome_tiff_level_zero_is_direct(tmp_path):
    """OpenSlide opens an OME-TIFF as generic-tiff and sees its first image only (the SubIFD
    pyramid is invisible to it); the direct path serves that level, pixel for pixel."""
    path = write_pyramid(tmp_path / "p.ome.tif", ome=True, photometric="ycbcr")
    with open_slide(path) as slide:
        assert slide.vendor == "generic-tiff" and slide.level_count == 1
        assert slide.level_backends == ("tifffile",)
        np.testing.assert_array_equal(
            np.asarray(slide.pyramid[0]), reference(path, 0, 0, 0, *slide.dimensions)
        )


def test_ndpi_stored_levels_are_direct_and_scaled_levels_openslide(ndpi_path):
    with open_slide(ndpi_path) as slide:
        assert slide.backend_name == "tifffile+openslide"
        assert slide.level_backends == ("tifffile",) * 4 + ("openslide",) * 3
        assert slide.metadata()["level_backends"] == slide.level_backends
        for level in range(slide.level_count):
            w, h = slide.level_dimensions[level]
            np.testing.assert_array_equal(
                slide.read_level(level, 0, 0, w, h), reference(ndpi_path, level, 0, 0, w, h)
            )
    with pytest.raises(SlideError, match="cannot be read tile by tile"):
        open_slide(ndpi_path, backend="tifffile")


@pytest.mark.parametrize(
    ("name", "backends"),
    [
        ("CMU-1-Small-Region.svs", ("tifffile",)),
        ("boxes.tiff", ("tifffile",) * 4),
        ("small.svs", ("tifffile",)),
        ("camelyon16_multiframe_jpeg.dcm", ("openslide",)),
        ("highdicom_sm_image.dcm", ("openslide",)),
    ],
)
def test_which_levels_take_the_direct_path(name, backends):
    with open_slide(wsi(name)) as slide:
        assert slide.level_backends == backends


def _read_in_child(path: str) -> int:
    with open_slide(path) as slide:
        return int(slide.read_level(0, 100, 100, 1500, 900).sum())


def test_a_forked_child_reads_with_a_pool_of_its_own(pyramid_path):
    """DataLoader workers fork: the child must not wait on the parent's pool threads."""
    import multiprocessing

    with open_slide(pyramid_path) as slide:
        expected = int(slide.read_level(0, 100, 100, 1500, 900).sum())  # the pool exists now
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_read_in_child, (str(pyramid_path),)).get(timeout=120) == expected
