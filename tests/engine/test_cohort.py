"""Cohort CSVs: validation errors (each raised before training), splits, the slide Dataset."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_magnet.cli import main
from napari_magnet.engine.cohort import (
    CohortError,
    SlideDataset,
    SlidePool,
    class_counts,
    read_cohort,
    split_cohort,
)
from napari_magnet.synth import generate_cohort

# Small real slides: 2048 px at 1.5 µm/px is 3.1 mm, room for every lesion class.
COHORT_SIDE = 2048
COHORT_MPP = 1.5
COHORT_N = 8


def make_cohort(tmp_path_factory) -> Path:
    """The shared synthetic cohort (generated once per test session), its ``cohort.csv``."""
    root = tmp_path_factory.getbasetemp() / "napari-magnet-cohort"
    csv_path = root / "cohort.csv"
    if not csv_path.exists():
        generate_cohort(
            root, COHORT_N, seed=3, width=COHORT_SIDE, height=COHORT_SIDE, mpp=COHORT_MPP
        )
    return csv_path


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory)


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def absolute_rows(cohort_csv: Path) -> list[dict]:
    rows = rows_of(cohort_csv)
    for r in rows:
        r["path"] = str(cohort_csv.parent / r["path"])
    return rows


def test_reads_generated_cohort(cohort_csv):
    records = read_cohort(cohort_csv)
    assert len(records) == COHORT_N
    assert all(r.path.is_absolute() and r.path.exists() for r in records)
    assert sum(r.label for r in records) == COHORT_N // 2
    counts = class_counts(records)
    assert counts["negative"] == COHORT_N // 2
    assert set(counts) <= {"negative", "itc", "micro", "macro"}
    positives = [r for r in records if r.label == 1]
    assert all(len(r.lesion_boxes) >= 1 and len(r.lesion_boxes[0]) == 4 for r in positives)
    assert [r.row for r in records] == list(range(2, COHORT_N + 2))
    without_itc = read_cohort(cohort_csv, exclude_classes=["itc"])
    assert all(r.lesion_class != "itc" for r in without_itc)
    assert len(without_itc) == COHORT_N - counts.get("itc", 0)


def test_optional_columns_and_label_spellings(cohort_csv, tmp_path):
    rows = absolute_rows(cohort_csv)
    for r in rows:
        r["label"] = "Tumor" if r["label"] == "1" else "normal"
    path = write_rows(tmp_path / "minimal.csv", rows, ["path", "label"])
    records = read_cohort(path)
    assert {r.lesion_class for r in records} == {"positive", "negative"}
    assert [r.label for r in records] == [1 if r["label"] == "Tumor" else 0 for r in rows]


@pytest.mark.parametrize("column", ["path", "label"])
def test_missing_column(cohort_csv, tmp_path, column):
    rows = absolute_rows(cohort_csv)
    columns = [c for c in rows[0] if c != column]
    path = write_rows(tmp_path / "cohort.csv", rows, columns)
    with pytest.raises(CohortError, match=f"missing column.*{column}") as info:
        read_cohort(path)
    assert str(path) in str(info.value)


def test_missing_file_names_row_and_file(cohort_csv, tmp_path):
    rows = absolute_rows(cohort_csv)
    rows[3]["path"] = str(tmp_path / "gone.tif")
    path = write_rows(tmp_path / "cohort.csv", rows)
    with pytest.raises(CohortError) as info:
        read_cohort(path)
    message = str(info.value)
    assert "row 5" in message and "gone.tif" in message and "not found" in message


def test_unknown_label_and_class(cohort_csv, tmp_path):
    rows = absolute_rows(cohort_csv)
    rows[0]["label"] = "maybe"
    rows[1]["lesion_class"] = "huge"
    path = write_rows(tmp_path / "cohort.csv", rows)
    with pytest.raises(CohortError) as info:
        read_cohort(path)
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "row 2" in message and "unknown label 'maybe'" in message
    assert "row 3" in message and "unknown lesion_class 'huge'" in message


def test_class_contradicting_label(cohort_csv, tmp_path):
    rows = absolute_rows(cohort_csv)
    neg = next(i for i, r in enumerate(rows) if r["label"] == "0")
    rows[neg]["lesion_class"] = "macro"
    path = write_rows(tmp_path / "cohort.csv", rows)
    with pytest.raises(CohortError, match=f"row {neg + 2}.*contradicts label 0"):
        read_cohort(path)


def test_one_class_only(cohort_csv, tmp_path):
    rows = [r for r in absolute_rows(cohort_csv) if r["label"] == "0"]
    path = write_rows(tmp_path / "cohort.csv", rows)
    with pytest.raises(CohortError, match="all 4 slides are negative"):
        read_cohort(path)
    # excluding every positive class leaves one class too
    with pytest.raises(CohortError, match="all .* slides are negative"):
        read_cohort(cohort_csv, exclude_classes=["itc", "micro", "macro"])


def test_duplicates_bad_boxes_empty_and_unknown_exclusion(cohort_csv, tmp_path):
    rows = absolute_rows(cohort_csv)
    rows.append(dict(rows[0]))
    rows[1]["lesion_boxes"] = "[[1, 2, 3]]"
    path = write_rows(tmp_path / "cohort.csv", rows)
    with pytest.raises(CohortError) as info:
        read_cohort(path)
    assert "duplicate of row 2" in str(info.value)
    assert "row 3" in str(info.value) and "lesion_boxes" in str(info.value)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(CohortError, match="empty CSV"):
        read_cohort(empty)
    with pytest.raises(CohortError, match="not found"):
        read_cohort(tmp_path / "nope.csv")
    with pytest.raises(CohortError, match="unknown lesion classes"):
        read_cohort(cohort_csv, exclude_classes=["tiny"])


def test_bad_csv_fails_before_training(cohort_csv, tmp_path, capsys):
    rows = absolute_rows(cohort_csv)
    rows[2]["path"] = str(tmp_path / "missing_slide.tif")
    path = write_rows(tmp_path / "bad.csv", rows)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--slides",
            str(path),
            "--model",
            "magnet3-lite",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "row 4" in err and "missing_slide.tif" in err
    assert not out.exists()  # nothing was written: the error came before training


def test_split_is_stratified_deterministic_and_checked(cohort_csv):
    records = read_cohort(cohort_csv)
    train, val = split_cohort(records, 0.25, seed=0)
    assert {r.path for r in train} | {r.path for r in val} == {r.path for r in records}
    assert not {r.path for r in train} & {r.path for r in val}
    assert {r.label for r in val} == {0, 1} and {r.label for r in train} == {0, 1}
    assert len(val) == 2
    again = split_cohort(records, 0.25, seed=0)
    assert [r.path for r in again[1]] == [r.path for r in val]
    assert split_cohort(records, 0.0, seed=0) == (records, [])
    # proportional stratification over classes on a larger cohort
    from dataclasses import replace

    many = [
        replace(r, path=Path(f"/x/{i}_{r.path.name}"), row=i) for i, r in enumerate(records * 10)
    ]
    _, val_many = split_cohort(many, 0.2, seed=1)
    counts, val_counts = class_counts(many), class_counts(val_many)
    for cls, n in counts.items():
        assert abs(val_counts.get(cls, 0) - 0.2 * n) <= 1
    with pytest.raises(CohortError, match="val_fraction"):
        split_cohort(records, 1.0, seed=0)
    tiny = [r for r in records if r.label == 0][:1] + [r for r in records if r.label == 1][:1]
    with pytest.raises(CohortError, match="validation split without both labels"):
        split_cohort(tiny, 0.5, seed=0)


def test_dataset_renders_layer1_letterboxed(tmp_path, cohort_csv):
    from napari_magnet.engine.frames import slide_frame
    from napari_magnet.engine.regions import RegionReader
    from napari_magnet.slide import open_slide
    from napari_magnet.synth import SyntheticSlideSpec, generate_slide

    wide = generate_slide(
        tmp_path / "wide.tif", SyntheticSlideSpec(1536, 768, mpp=2.0, seed=5, label=0)
    )
    records = read_cohort(cohort_csv)[:1]
    from dataclasses import replace

    records.append(replace(records[0], path=wide.path, row=99))
    with SlidePool(max_open=1) as pool:
        dataset = SlideDataset(records, (56, 112), pool)
        assert len(dataset) == 2
        item = dataset[1]
        lo, hi = item["images"]
        assert lo.shape == (3, 56, 56) and hi.shape == (3, 112, 112)
        assert item["label"].item() == 0.0 and item["index"].item() == 1
        with open_slide(wide.path) as slide, RegionReader(slide) as reader:
            frame, visible = slide_frame(slide)
            want = reader.read(frame, 112, visible).images[0]
        np.testing.assert_array_equal(hi.permute(1, 2, 0).numpy(), want)
        # 2:1 slide letterboxed: a quarter of the square above and below is black padding
        assert hi[:, :27].max() == 0 and hi[:, -27:].max() == 0
        assert hi[:, 30:82].float().mean() > 100
        first = dataset[0]["images"][0]
        assert first.dtype.is_floating_point is False and first.shape == (3, 56, 56)
        assert len(pool._open) == 1  # LRU of one slide


def test_write_cohort_round_trips_through_read_cohort(tmp_path, cohort_csv):
    import json

    from napari_magnet.engine.cohort import write_cohort

    rows = [
        {
            "path": "a.tif",
            "label": 1,
            "lesion_class": "micro",
            "lesion_boxes": [(10, 20, 30.5, 40), np.array([1.0, 2.0, 3.0, 4.0])],
        },
        {"path": tmp_path / "b.tif", "label": 0, "lesion_class": "negative"},
        {"path": "c.tif", "label": np.int64(1), "lesion_class": "", "lesion_boxes": []},
    ]
    csv_path = write_cohort(tmp_path / "sub" / "cohort.csv", rows)
    assert csv_path == tmp_path / "sub" / "cohort.csv"
    assert not [p for p in csv_path.parent.iterdir() if p != csv_path]  # no temporary left
    records = read_cohort(csv_path, check_files=False)
    assert [r.path for r in records] == [
        tmp_path / "sub" / "a.tif",
        tmp_path / "b.tif",
        tmp_path / "sub" / "c.tif",
    ]
    assert [r.label for r in records] == [1, 0, 1]
    assert [r.lesion_class for r in records] == ["micro", "negative", "positive"]
    assert records[0].lesion_boxes == ((10.0, 20.0, 30.5, 40.0), (1.0, 2.0, 3.0, 4.0))
    assert records[1].lesion_boxes == records[2].lesion_boxes == ()
    # what read_cohort returns writes back to the same records
    again = write_cohort(tmp_path / "again.csv", [r.to_dict() for r in records])
    assert read_cohort(again, check_files=False) == records
    # the generator's cohort.csv, rewritten from its own rows, is byte for byte the same
    generated = [
        dict(r, label=int(r["label"]), lesion_boxes=json.loads(r["lesion_boxes"]))
        for r in rows_of(cohort_csv)
    ]
    copy = write_cohort(tmp_path / "copy.csv", generated)
    assert copy.read_bytes() == cohort_csv.read_bytes()
    assert cohort_csv.read_bytes().startswith(b"path,label,lesion_class,lesion_boxes\r\n")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        write_cohort(tmp_path / "bad.csv", [{"path": "x.tif", "label": 2}])
    with pytest.raises(ValueError, match="unknown lesion_class"):
        write_cohort(tmp_path / "bad.csv", [{"path": "x.tif", "label": 1, "lesion_class": "big"}])
    assert not (tmp_path / "bad.csv").exists()
