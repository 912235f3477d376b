"""Attention maps as OME-TIFF: round trip, OME physical sizes, level-0 placement."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import tifffile

from napari_magnet.io.ome import (
    NAMESPACE,
    AttentionMap,
    AttentionMapError,
    read_attention_ome_tiff,
    write_attention_ome_tiff,
)


def _map(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def test_round_trip(tmp_path):
    arr = _map()
    box = (1234.5, 2048.0, 1234.5 + 40 * 16.25, 2048.0 + 24 * 16.5)
    path = write_attention_ome_tiff(tmp_path / "a.ome.tif", arr, box, (0.2501, 0.2499), "L1 #0")
    m = read_attention_ome_tiff(path)
    assert isinstance(m, AttentionMap)
    assert m.array.dtype == np.float32 and m.array.shape == (24, 40)
    np.testing.assert_array_equal(m.array, arr)
    assert m.box == box  # exact: written as repr() of the floats
    assert m.mpp == (0.2501, 0.2499)
    assert m.name == "L1 #0"
    assert m.pixel_size == pytest.approx((16.25, 16.5))
    assert m.physical_pixel_size == pytest.approx((16.25 * 0.2501, 16.5 * 0.2499))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ome.tif"]  # no temp file left


def test_tifffile_sees_ome_physical_sizes(tmp_path):
    arr = _map(10, 20)
    mpp = (0.5, 0.25)
    box = (1000.0, 3000.0, 1000.0 + 20 * 32, 3000.0 + 10 * 64)  # 32 × 64 level-0 px per pixel
    path = write_attention_ome_tiff(tmp_path / "a.ome.tif", arr, box, mpp, "att")
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome
        assert tf.series[0].axes == "YX" and tf.series[0].shape == (10, 20)
        root = ET.fromstring(tf.ome_metadata)
        xres = tf.pages.first.tags["XResolution"].value
        unit = tf.pages.first.tags["ResolutionUnit"].value
    pixels = next(e for e in root.iter() if _local(e.tag) == "Pixels")
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(32 * 0.5)
    assert float(pixels.get("PhysicalSizeY")) == pytest.approx(64 * 0.25)
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("PhysicalSizeYUnit") == "µm"
    plane = next(e for e in root.iter() if _local(e.tag) == "Plane")
    assert float(plane.get("PositionX")) == pytest.approx(1000 * 0.5)
    assert float(plane.get("PositionY")) == pytest.approx(3000 * 0.25)
    assert plane.get("PositionXUnit") == "µm"
    ann = next(e for e in root.iter() if _local(e.tag) == "MapAnnotation")
    assert ann.get("Namespace") == NAMESPACE
    values = {m.get("K"): m.text for m in ann.iter() if _local(m.tag) == "M"}
    assert float(values["x0"]) == 1000.0 and float(values["y1"]) == 3640.0
    # TIFF resolution tags for non-OME readers: pixels per centimetre
    assert int(unit) == 3
    assert xres[0] / xres[1] == pytest.approx(1e4 / 16.0, rel=1e-6)


def test_pixel_to_level0(tmp_path):
    h, w = 8, 12
    arr = np.zeros((h, w), np.float32)
    arr[5, 7] = 1.0  # one hot pixel
    box = (10_000.0, 20_000.0, 10_000.0 + w * 100.0, 20_000.0 + h * 50.0)
    m = read_attention_ome_tiff(
        write_attention_ome_tiff(tmp_path / "a.ome.tif", arr, box, (0.25, 0.25), "x")
    )
    i, j = np.unravel_index(np.argmax(m.array), m.shape)
    assert (i, j) == (5, 7)
    # centre of pixel (5, 7): x = x0 + 7.5·100, y = y0 + 5.5·50
    assert m.pixel_to_level0(i, j) == pytest.approx((10_750.0, 20_275.0))
    assert m.pixel_to_level0(i, j, center=False) == pytest.approx((10_700.0, 20_250.0))
    assert m.level0_to_pixel(10_750.0, 20_275.0) == (5, 7)
    assert m.level0_to_pixel(10_700.0, 20_250.0) == (5, 7)  # top-left corner belongs to it
    assert m.level0_to_pixel(10_699.9, 20_250.0) == (5, 6)
    # the far corner of the last pixel is the box's corner; vectorised form
    xs, ys = m.pixel_to_level0(np.array([h - 1]), np.array([w - 1]), center=False)
    assert xs[0] + m.pixel_size[0] == pytest.approx(box[2])
    assert ys[0] + m.pixel_size[1] == pytest.approx(box[3])
    # physical position (µm) agrees with what OME says
    with tifffile.TiffFile(tmp_path / "a.ome.tif") as tf:
        root = ET.fromstring(tf.ome_metadata)
    plane = next(e for e in root.iter() if _local(e.tag) == "Plane")
    pixels = next(e for e in root.iter() if _local(e.tag) == "Pixels")
    x_um = float(plane.get("PositionX")) + (j + 0.5) * float(pixels.get("PhysicalSizeX"))
    assert x_um == pytest.approx(m.pixel_to_level0(i, j)[0] * 0.25)


def test_without_mpp_uses_pixel_units(tmp_path):
    arr = _map(6, 9)
    box = (0.0, 0.0, 900.0, 600.0)
    path = write_attention_ome_tiff(tmp_path / "a.ome.tif", arr, box, None, "no mpp")
    m = read_attention_ome_tiff(path)
    assert m.mpp is None and m.box == box and m.physical_pixel_size is None
    with tifffile.TiffFile(path) as tf:
        root = ET.fromstring(tf.ome_metadata)
    pixels = next(e for e in root.iter() if _local(e.tag) == "Pixels")
    assert pixels.get("PhysicalSizeXUnit") == "pixel"
    assert float(pixels.get("PhysicalSizeX")) == pytest.approx(100.0)


def test_large_map_is_tiled_and_float64_cast(tmp_path):
    arr = np.random.default_rng(1).random((1500, 1100))  # float64
    path = write_attention_ome_tiff(
        tmp_path / "big.ome.tif", arr, (0, 0, 11000, 15000), (0.5, 0.5), "big"
    )
    with tifffile.TiffFile(path) as tf:
        assert tf.pages.first.is_tiled
    m = read_attention_ome_tiff(path)
    np.testing.assert_array_equal(m.array, arr.astype(np.float32))


def test_fallback_to_ome_physical_metadata(tmp_path):
    """A plain OME-TIFF (no napari-magnet metadata) is placed from OME sizes/positions."""
    arr = _map(4, 5)
    path = tmp_path / "foreign.ome.tif"
    tifffile.imwrite(
        path,
        arr,
        ome=True,
        metadata={
            "axes": "YX",
            "PhysicalSizeX": 8.0,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": 4.0,
            "PhysicalSizeYUnit": "µm",
            "Plane": {
                "PositionX": [100.0],
                "PositionXUnit": ["µm"],
                "PositionY": [50.0],
                "PositionYUnit": ["µm"],
            },
        },
    )
    with pytest.raises(AttentionMapError, match="no level-0 placement"):
        read_attention_ome_tiff(path)
    m = read_attention_ome_tiff(path, slide_mpp=(0.5, 0.5))
    assert m.box == pytest.approx((200.0, 100.0, 200.0 + 5 * 16, 100.0 + 4 * 8))
    assert m.mpp == (0.5, 0.5)


def test_bad_inputs(tmp_path):
    with pytest.raises(AttentionMapError, match="2-D"):
        write_attention_ome_tiff(
            tmp_path / "a.ome.tif", np.zeros((2, 3, 4)), (0, 0, 1, 1), None, "x"
        )
    with pytest.raises(AttentionMapError, match="box"):
        write_attention_ome_tiff(tmp_path / "a.ome.tif", _map(), (10, 0, 5, 1), None, "x")
    with pytest.raises(AttentionMapError, match="mpp"):
        write_attention_ome_tiff(tmp_path / "a.ome.tif", _map(), (0, 0, 5, 5), (0, 1), "x")
    assert not list(tmp_path.iterdir())
    (tmp_path / "junk.ome.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(AttentionMapError, match="junk.ome.tif"):
        read_attention_ome_tiff(tmp_path / "junk.ome.tif")
    with pytest.raises(AttentionMapError, match="missing"):
        read_attention_ome_tiff(tmp_path / "missing.ome.tif")
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, _map())
    with pytest.raises(AttentionMapError, match="no level-0 placement"):
        read_attention_ome_tiff(plain)
