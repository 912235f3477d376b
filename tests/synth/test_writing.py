"""generate_slide: real pyramidal JPEG TIFFs that OpenSlide opens, with their ground truth."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import openslide
import pytest
import tifffile

from napari_magnet.synth import (
    SyntheticSlideInfo,
    SyntheticSlideSpec,
    generate_slide,
    read_ground_truth,
    sidecar_path,
)

W, H, MPP = 8192, 6144, 0.5


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[SyntheticSlideInfo, list[tuple[int, int]]]:
    path = tmp_path_factory.mktemp("micro") / "micro.tif"
    calls: list[tuple[int, int]] = []
    spec = SyntheticSlideSpec(W, H, MPP, seed=1, label=1, lesion_kind="micro")
    info = generate_slide(path, spec, progress=lambda done, total: calls.append((done, total)))
    return info, calls


def _rgb(slide: openslide.OpenSlide, xy, level, size) -> np.ndarray:
    return np.asarray(slide.read_region(xy, level, size).convert("RGB"))


def test_openslide_opens_it_as_generic_tiff(micro):
    info, _ = micro
    with openslide.OpenSlide(info.path) as slide:
        props = slide.properties
        assert props[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert openslide.OpenSlide.detect_format(info.path) == "generic-tiff"
        assert float(props[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
        assert float(props[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP)
        assert slide.level_count > 1
        assert slide.dimensions == (W, H)
        assert tuple(slide.level_dimensions) == info.levels
        assert max(slide.level_dimensions[-1]) <= 1024
        w0, h0 = slide.level_dimensions[0]
        for (w, h), down in zip(slide.level_dimensions, slide.level_downsamples):
            assert down == pytest.approx((w0 / w + h0 / h) / 2, rel=1e-6)
        assert all(b > a for a, b in zip(slide.level_downsamples, slide.level_downsamples[1:]))
        assert int(props["openslide.level[0].tile-width"]) == 512


def test_tiff_structure(micro):
    info, _ = micro
    with tifffile.TiffFile(info.path) as tif:
        pages = list(tif.pages)
        assert len(pages) == len(info.levels)
        for i, page in enumerate(pages):
            assert page.is_tiled and page.compression == tifffile.COMPRESSION.JPEG
            assert (page.shape[1], page.shape[0]) == info.levels[i]
            assert page.subfiletype == (0 if i == 0 else tifffile.FILETYPE.REDUCEDIMAGE)
            assert not page.subifds
        assert pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER


def test_progress_reports_every_tile(micro):
    info, calls = micro
    total = sum(math.ceil(w / 512) * math.ceil(h / 512) for w, h in info.levels)
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert {t for _, t in calls} == {total}


def test_sidecar_round_trips(micro):
    info, _ = micro
    side = sidecar_path(info.path)
    assert side.name == "micro.truth.json" and side.exists()
    assert read_ground_truth(info.path) == info
    assert read_ground_truth(side) == info
    data = json.loads(side.read_text())
    assert data["label"] == 1 and data["lesion_kind"] == "micro"


def test_lesion_is_visible_and_darker_than_tissue(micro):
    info, _ = micro
    assert info.label == 1 and info.lesion_kind == "micro"
    tumour = info.tumour_lesions
    assert tumour and max(tumour, key=lambda les: les.size_mm(MPP)).kind == "micro"
    les = tumour[0]
    x0, y0, x1, y1 = les.box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = int(0.15 * min(x1 - x0, y1 - y0))
    with openslide.OpenSlide(info.path) as slide:
        lesion = _rgb(slide, (int(cx - half), int(cy - half)), 0, (2 * half, 2 * half))
        glass = _rgb(slide, (0, 0), 0, (256, 256))  # corners are glass
        assert glass.std() < 3 and glass.mean() > 200
        assert lesion.mean() < glass.mean() - 40
        # against normal tissue, on the lowest level: tissue = not glass, outside all boxes
        level = slide.level_count - 1
        down = slide.level_downsamples[level]
        low = _rgb(slide, (0, 0), level, slide.level_dimensions[level]).astype(np.float64)
    glass_rgb = glass.reshape(-1, 3).mean(0)
    tissue = np.abs(low - glass_rgb).max(-1) > 25
    outside = np.ones(tissue.shape, bool)
    for other in info.lesions:
        bx0, by0, bx1, by1 = (int(v / down) for v in other.box)
        outside[max(by0 - 2, 0) : by1 + 3, max(bx0 - 2, 0) : bx1 + 3] = False
    normal = low[tissue & outside]
    assert normal.shape[0] > 100
    assert lesion.mean() < normal.mean() - 15


def test_tifffile_and_openslide_agree(micro):
    info, _ = micro
    with tifffile.TiffFile(info.path) as tif, openslide.OpenSlide(info.path) as slide:
        for level in (0, 1, len(info.levels) - 1):
            page = tif.pages[level]
            arr = page.asarray()
            down = slide.level_downsamples[level]
            # a tile with tissue in it (largest spread), read both ways
            ty, tx = 0, 0
            if level < len(info.levels) - 1:
                best = -1.0
                for y in range(0, arr.shape[0] - 511, 512):
                    for x in range(0, arr.shape[1] - 511, 512):
                        spread = float(arr[y : y + 512 : 8, x : x + 512 : 8].std())
                        if spread > best:
                            best, ty, tx = spread, y // 512, x // 512
            tile = arr[ty * 512 : (ty + 1) * 512, tx * 512 : (tx + 1) * 512]
            h, w = tile.shape[:2]
            ref = _rgb(slide, (round(tx * 512 * down), round(ty * 512 * down)), level, (w, h))
            assert tile.std() > 5  # not a blank tile
            assert np.abs(tile.astype(int) - ref.astype(int)).mean() < 1.0


def test_lower_levels_match_downsampled_level0(micro):
    info, _ = micro
    les = info.tumour_lesions[0]
    x = int(max(0, min(W - 2048, (les.box[0] + les.box[2]) / 2 - 1024)) // 16 * 16)
    y = int(max(0, min(H - 2048, (les.box[1] + les.box[3]) / 2 - 1024)) // 16 * 16)
    with openslide.OpenSlide(info.path) as slide:
        full = _rgb(slide, (x, y), 0, (2048, 2048)).astype(np.float64)
        for level, down in ((1, 4), (2, 16)):
            n = 2048 // down
            low = _rgb(slide, (x, y), level, (n, n)).astype(np.float64)
            binned = full.reshape(n, down, n, down, 3).mean(axis=(1, 3))
            assert np.abs(binned.mean((0, 1)) - low.mean((0, 1))).max() < 3
            assert np.abs(binned - low).mean() < 12


def test_deterministic_whatever_the_thread_count(tmp_path):
    spec = SyntheticSlideSpec(2048, 1536, 0.25, seed=11, label=1, lesion_kind="itc")
    a = generate_slide(tmp_path / "a.tif", spec, workers=1)
    b = generate_slide(tmp_path / "b.tif", spec, workers=2)
    assert a.lesions == b.lesions and a.levels == b.levels and a.label == b.label == 1

    def tile_hashes(path):
        with tifffile.TiffFile(path) as tif:
            tiles = [page.asarray()[:512, :512] for page in tif.pages]
        return [hashlib.sha256(tile.tobytes()).hexdigest() for tile in tiles]

    assert tile_hashes(a.path) == tile_hashes(b.path)
    assert a.path.read_bytes() == b.path.read_bytes()
    with openslide.OpenSlide(a.path) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    # another seed gives another slide
    other = SyntheticSlideSpec(2048, 1536, 0.25, seed=12, label=1, lesion_kind="itc")
    c = generate_slide(tmp_path / "c.tif", other)
    assert tile_hashes(c.path) != tile_hashes(a.path)


def test_negative_slide_has_no_tumour(tmp_path):
    spec = SyntheticSlideSpec(4096, 3072, 1.0, seed=0, label=0)
    info = generate_slide(tmp_path / "neg.tif", spec)
    assert info.label == 0 and info.lesion_kind == "negative"
    assert info.tumour_lesions == ()
    assert all(les.kind == "distractor" for les in info.lesions)
    assert read_ground_truth(info.path).label == 0


def test_progress_exception_aborts_without_leftovers(tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done > total // 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        generate_slide(tmp_path / "s.tif", SyntheticSlideSpec(2048, 2048, 0.5, seed=5), cancel)
    assert not list(tmp_path.iterdir())
