"""JPEG tiles decoded by torchvision (the GPU path, run here on the CPU) against the host path.

The device path must give the pixels the host path gives (OpenSlide's): every stored tile of
the real SVS, generated RGB and YCbCr JPEG pyramids, a tile the file does not store, and
regions through :class:`RegionReader` with ``decode="device"``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from napari_magnet.engine.regions import RegionReader
from napari_magnet.engine.tile_decode import DeviceTileDecoder, device_decoding_available
from napari_magnet.slide import SlideError, open_slide

from ..conftest import wsi
from ..slide.test_reads import write_pyramid


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tile_decode")
    return {p: write_pyramid(folder / f"{p}.tif", photometric=p) for p in ("rgb", "ycbcr")}


def _frames(rng, width, height, n=48):
    """Square frames of many sizes, some past the slide's edge, some on the pixel grid."""
    side = rng.uniform(40, 1500, n)
    x0, y0 = rng.uniform(-150, width, n), rng.uniform(-150, height, n)
    frames = np.stack([x0, y0, x0 + side, y0 + side], 1)
    frames[:6] = [[i * 200, 64, i * 200 + 224, 288] for i in range(6)]  # cropped, not resampled
    return frames


def test_every_stored_svs_tile_decodes_to_the_direct_paths_pixels():
    with open_slide(wsi("CMU-1-Small-Region.svs")) as slide:
        tiles = slide.jpeg_tiles(0)
        assert tiles is not None and (tiles.tile_width, tiles.tile_height) == (240, 240)
        count = tiles.tiles_across * -(-tiles.height // tiles.tile_height)
        streams = [
            torch.frombuffer(bytearray(tiles.stream(i)), dtype=torch.uint8) for i in range(count)
        ]
        decoded = decode_jpeg(streams, mode=ImageReadMode.RGB)
        for i, tile in enumerate(decoded):
            tx, ty = i % tiles.tiles_across, i // tiles.tiles_across
            x, y = tx * 240, ty * 240
            w, h = min(240, tiles.width - x), min(240, tiles.height - y)
            expected = slide.read_level(0, x, y, w, h)
            np.testing.assert_array_equal(tile.permute(1, 2, 0).numpy()[:h, :w], expected)


def test_levels_without_standalone_jpeg_tiles_have_no_source(pyramids):
    with open_slide(wsi("hamamatsu_fluorescence_DAPI.ndpi")) as slide:  # restart-interval tiles
        assert all(slide.jpeg_tiles(lv) is None for lv in range(slide.level_count))
    with open_slide(wsi("boxes.tiff")) as slide:  # deflate
        assert slide.jpeg_tiles(0) is None
    with open_slide(pyramids["rgb"], backend="openslide") as slide:  # not the direct path
        assert slide.jpeg_tiles(0) is None
    with open_slide(pyramids["rgb"]) as slide, pytest.raises(ValueError, match="level 9"):
        slide.jpeg_tiles(9)


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "rgb", "ycbcr", "ndpi"])
def test_regions_decoded_on_the_device_equal_the_host_path(name, pyramids):
    path = {
        "CMU-1-Small-Region.svs": wsi("CMU-1-Small-Region.svs"),
        "ndpi": wsi("hamamatsu_fluorescence_DAPI.ndpi"),  # read on the host: same result
    }.get(name) or pyramids[name]
    rng = np.random.default_rng(len(name))
    with open_slide(path) as slide:
        frames = _frames(rng, *slide.dimensions)
        for size in (64, 224):
            with (
                RegionReader(slide, decode="host") as host,
                RegionReader(slide, decode="device") as device,
            ):
                a, b = host.read(frames, size), device.read(frames, size)
                assert torch.equal(a.pixels, b.pixels)
                np.testing.assert_array_equal(a.levels, b.levels)
                assert a.pixels_read == b.pixels_read > 0


def test_the_tile_cache_is_reused_and_bounded_and_a_batch_larger_than_it_is_whole(pyramids):
    with open_slide(pyramids["ycbcr"]) as slide:
        decoder = DeviceTileDecoder(slide, "cpu", max_tiles=4)
        windows = [(0, 0, 0, 1200, 700), (0, 300, 200, 900, 900)]  # 15 and 20 tiles
        first = decoder.windows(windows)
        for (level, x, y, w, h), window in zip(windows, first):
            np.testing.assert_array_equal(
                window.permute(1, 2, 0).numpy(), slide.read_level(level, x, y, w, h)
            )
        assert decoder.tiles_decoded == 23  # the union of the two windows' tiles, once each
        assert len(decoder._cache) == 4
        small = (0, 1050, 1050, 100, 50)  # inside tile (4, 4), among the last 4 decoded
        decoder.windows([small])
        assert decoder.tiles_decoded == 23  # from the cache
        decoder.windows([(0, 10, 10, 20, 20)])  # tile (0, 0): dropped, decoded again
        assert decoder.tiles_decoded == 24
        assert decoder.windows([None, (1, 0, 0, 10, 10)])[0] is None


def test_a_tile_the_file_does_not_store_takes_the_background(tmp_path):
    path = write_pyramid(tmp_path / "holes.tif", width=1024, height=768, levels=1)
    with tifffile.TiffFile(path, mode="r+") as tif:
        counts = list(tif.pages[0].tags["TileByteCounts"].value)
        counts[5] = 0  # tile (1, 1) of a 4-wide grid
        tif.pages[0].tags["TileByteCounts"].overwrite(counts)
    with open_slide(path) as slide:
        decoder = DeviceTileDecoder(slide, "cpu")
        (window,) = decoder.windows([(0, 200, 200, 400, 200)])
        expected = slide.read_level(0, 200, 200, 400, 200)
        np.testing.assert_array_equal(window.permute(1, 2, 0).numpy(), expected)
        hole = window[:, 56:200, 56:200]  # level pixels 256..400: inside the missing tile
        assert (hole == torch.tensor(slide.background).view(3, 1, 1)).all()


def test_auto_decodes_on_the_device_only_on_a_gpu():
    assert not device_decoding_available("cpu")
    assert device_decoding_available(torch.device("cuda", 0))
    with open_slide(wsi("CMU-1-Small-Region.svs")) as slide:
        with pytest.raises(ValueError, match="decode"):
            RegionReader(slide, decode="gpu")
        with RegionReader(slide) as reader:
            reader.read(np.array([[0, 0, 500, 500]]), 64)
            assert reader._decoders == {}  # the host path on a CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_tiles_are_decoded_by_nvjpeg_close_to_the_host_path():
    with open_slide(wsi("CMU-1-Small-Region.svs")) as slide:
        frames = _frames(np.random.default_rng(3), *slide.dimensions)
        with RegionReader(slide, decode="host") as host, RegionReader(slide, device="cuda") as gpu:
            a, b = host.read(frames, 224), gpu.read(frames, 224)
            assert b.pixels.is_cuda and gpu._decoders
            # nvJPEG's IDCT and upsampling may round differently from libjpeg-turbo
            diff = (a.pixels.int() - b.pixels.cpu().int()).abs()
            assert diff.float().mean() < 1.0 and diff.max() <= 16


def test_a_tile_the_device_decoder_refuses_falls_back_to_the_host_path(tmp_path):
    path = write_pyramid(tmp_path / "bad.tif", width=1024, height=768, levels=1)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[5]
    with open(path, "r+b") as f:  # tile (1, 1): its header's tables zeroed
        f.seek(offset + 2)
        f.write(b"\x00" * 20)
    with open_slide(path) as slide:
        good = np.array([[0.0, 0.0, 200.0, 200.0]])  # tile (0, 0) only
        bad = np.array([[300.0, 300.0, 500.0, 500.0]])
        with RegionReader(slide, decode="host") as reader, pytest.raises(SlideError) as host:
            reader.read(bad, 64)
        with RegionReader(slide, decode="device") as reader:
            before = reader.read(good, 64).pixels
            with pytest.warns(RuntimeWarning, match="decodes on the CPU from now on"):
                with pytest.raises(SlideError) as device:  # the host path says what it found
                    reader.read(bad, 64)
            assert str(device.value) == str(host.value)
            assert "cannot be decoded" in str(host.value)
            assert reader.decode == "host"
            assert torch.equal(reader.read(good, 64).pixels, before)
