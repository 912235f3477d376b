"""The synthetic slide generator: real pyramidal JPEG TIFFs that OpenSlide opens."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import numpy as np
import openslide
import pytest
import tifffile

from napari_magnet.slide.synthetic import (
    SIZE_RANGES_MM,
    Lesion,
    SyntheticSlideInfo,
    SyntheticSlideSpec,
    generate_cohort,
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


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[list[SyntheticSlideInfo], object]:
    # 4.1 x 3.1 mm at 1 µm/px: big enough for a macro lesion, small enough to be quick
    out = tmp_path_factory.mktemp("cohort")
    infos = generate_cohort(out, n=6, seed=3, width=4096, height=3072, mpp=1.0)
    return infos, out


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


def test_cohort_is_balanced_and_sized_like_camelyon(cohort):
    infos, out = cohort
    assert [i.label for i in infos].count(1) == 3
    assert sorted(i.lesion_kind for i in infos if i.label) == ["itc", "macro", "micro"]
    assert any(les.kind == "distractor" for i in infos if not i.label for les in i.lesions)
    for info in infos:
        assert info.path.exists() and read_ground_truth(info.path) == info
        tumour = info.tumour_lesions
        assert bool(tumour) == bool(info.label)
        for les in info.lesions:
            x0, y0, x1, y1 = les.box
            assert 0 <= x0 < x1 <= info.width and 0 <= y0 < y1 <= info.height
        for les in tumour:
            lo, hi = SIZE_RANGES_MM[les.kind]
            assert lo < les.size_mm(info.mpp) <= hi, (les, les.size_mm(info.mpp))
        if tumour:  # the slide's class is its largest tumour lesion
            largest = max(tumour, key=lambda les: les.size_mm(info.mpp))
            assert largest.kind == info.lesion_kind
    with open(out / "cohort.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "lesion_class", "lesion_boxes"]
    for row, info in zip(rows, infos):
        assert (out / row["path"]) == info.path
        assert int(row["label"]) == info.label and row["lesion_class"] == info.lesion_kind
        assert [tuple(b) for b in json.loads(row["lesion_boxes"])] == [
            les.box for les in info.tumour_lesions
        ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 32, "height": 4096}, "width"),
        ({"width": 4096, "height": 2**31}, "height"),
        ({"width": 4096.5, "height": 4096}, "width"),
        ({"mpp": 0.0}, "mpp"),
        ({"mpp": -0.5}, "mpp"),
        ({"mpp": float("nan")}, "mpp"),
        ({"lesion_kind": "huge"}, "lesion kind"),
        ({"lesion_kind": "distractor"}, "lesion kind"),
        ({"label": 0, "lesion_kind": "macro"}, "contradicts"),
        ({"label": 1, "lesion_kind": "negative"}, "contradicts"),
        ({"label": 2}, "label"),
        ({"seed": -1}, "seed"),
        ({"tile": 100}, "tile"),
        ({"quality": 0}, "quality"),
        ({"width": 1024, "height": 1024, "lesion_kind": "macro"}, "too small"),
        ({"width": 64, "height": 64, "mpp": 0.25, "label": 1}, "too small"),
    ],
)
def test_spec_validation(kwargs, match):
    args = {"width": 4096, "height": 4096, "mpp": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        SyntheticSlideSpec(**args)


def test_weighted_positives_in_parallel_give_the_serial_cohort(tmp_path, cohort):
    """``positives`` weights the classes; ``jobs`` changes nothing but the speed."""
    kw = dict(n=6, seed=5, width=2048, height=2048, mpp=1.0, positives=["micro", "micro", "itc"])
    serial = generate_cohort(tmp_path / "serial", **kw)
    parallel = generate_cohort(tmp_path / "parallel", jobs=2, **kw)
    kinds = [info.lesion_kind for info in serial]
    assert sorted(kinds) == ["itc", "micro", "micro", "negative", "negative", "negative"]
    assert [info.lesion_kind for info in parallel] == kinds
    for a, b in zip(serial, parallel):
        assert a.path.read_bytes() == b.path.read_bytes()
    assert (tmp_path / "serial" / "cohort.csv").read_text() == \
        (tmp_path / "parallel" / "cohort.csv").read_text()
    # without positives, a cohort is what it always was: every fitting class in turn
    infos, _ = cohort
    assert {"macro", "micro", "itc"} == {i.lesion_kind for i in infos if i.label == 1}


def test_other_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="lesion kind"):
        Lesion("tumour", (0, 0, 1, 1))
    with pytest.raises(ValueError, match="x1 > x0"):
        Lesion("itc", (5, 0, 1, 1))
    with pytest.raises(ValueError, match="SyntheticSlideSpec"):
        generate_slide(tmp_path / "x.tif", {"width": 4096})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must"):
        generate_cohort(tmp_path, n=0, seed=0, width=4096, height=4096)
    with pytest.raises(ValueError, match="mpp"):
        generate_cohort(tmp_path, n=2, seed=0, width=4096, height=4096, mpp=0)
    with pytest.raises(ValueError, match="positives must name"):
        generate_cohort(tmp_path, n=2, seed=0, width=4096, height=4096, positives=["tumour"])
    with pytest.raises(ValueError, match="too small for"):  # 1 mm: no room for a macro lesion
        generate_cohort(tmp_path, n=2, seed=0, width=1024, height=1024, mpp=1.0,
                        positives=["macro"])
    with pytest.raises(ValueError, match="jobs"):
        generate_cohort(tmp_path, n=2, seed=0, width=4096, height=4096, jobs=0)
    assert not list(tmp_path.iterdir())  # nothing written on bad arguments
    with pytest.raises(FileNotFoundError):
        read_ground_truth(tmp_path / "missing.tif")
    (tmp_path / "other.truth.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a napari-magnet"):
        read_ground_truth(tmp_path / "other.tif")


def test_progress_exception_aborts_without_leftovers(tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(done, total):
        if done > total // 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        generate_slide(tmp_path / "s.tif", SyntheticSlideSpec(2048, 2048, 0.5, seed=5), cancel)
    assert not list(tmp_path.iterdir())


def test_imports_neither_torch_nor_napari():
    import subprocess
    import sys

    code = (
        "import sys, napari_magnet.slide.synthetic; "
        "bad = [m for m in ('torch', 'napari', 'qtpy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
