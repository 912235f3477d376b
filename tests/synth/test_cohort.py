"""generate_cohort: balanced labels, Camelyon size classes, and the cohort.csv."""

from __future__ import annotations

import csv
import json

import pytest

from napari_magnet.synth import (
    SIZE_RANGES_MM,
    SyntheticSlideInfo,
    generate_cohort,
    read_ground_truth,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[list[SyntheticSlideInfo], object]:
    # 4.1 x 3.1 mm at 1 µm/px: big enough for a macro lesion, small enough to be quick
    out = tmp_path_factory.mktemp("cohort")
    infos = generate_cohort(out, n=6, seed=3, width=4096, height=3072, mpp=1.0)
    return infos, out


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
    assert (tmp_path / "serial" / "cohort.csv").read_text() == (
        tmp_path / "parallel" / "cohort.csv"
    ).read_text()
    # without positives, a cohort is what it always was: every fitting class in turn
    infos, _ = cohort
    assert {"macro", "micro", "itc"} == {i.lesion_kind for i in infos if i.label == 1}
