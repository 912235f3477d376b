"""AUROC against hand-computed cases (ties included), per-class summaries, and the evaluate
command on real slides through magnify."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from napari_magnet.cli import main
from napari_magnet.engine.cohort import read_cohort
from napari_magnet.engine.evaluation import (
    SlideOutcome,
    accuracy,
    auroc,
    evaluate_cohort,
    largest_lesion_mm,
    markdown_table,
    roi_in_lesion,
    summarize,
    write_report,
)
from napari_magnet.models.registry import load_model

from .test_cohort import COHORT_MPP, make_cohort


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory)


def pairwise_auroc(labels, scores) -> float:
    """Reference: the fraction of (positive, negative) pairs ordered right, ties one half."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_hand_computed_cases():
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied
    # pos 0.8 vs neg 0.8: tie (½), vs 0.1: win; pos 0.3 vs 0.8: loss, vs 0.1: win → 2.5 / 4
    assert auroc([1, 0, 1, 0], [0.8, 0.8, 0.3, 0.1]) == 0.625
    # 3 positives, 2 negatives with a three-way tie at 0.4:
    # pairs: (0.9, 0.4)=1 (0.9, 0.2)=1 (0.4, 0.4)=½ (0.4, 0.2)=1 (0.4, 0.4)=½ (0.4, 0.2)=1
    assert auroc([1, 1, 1, 0, 0], [0.9, 0.4, 0.4, 0.4, 0.2]) == pytest.approx(5 / 6)
    # the scale does not matter, only the order
    assert auroc([1, 0, 1, 0], [8, 8, 3, 1]) == 0.625
    assert np.isnan(auroc([1, 1], [0.2, 0.3])) and np.isnan(auroc([], []))


def test_auroc_matches_pairwise_reference_with_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        if labels.min() == labels.max():
            labels[0] = 1 - labels[0]
        scores = rng.integers(0, 5, n) / 4.0  # heavy ties
        assert auroc(labels, scores) == pytest.approx(pairwise_auroc(labels, scores))


def test_auroc_and_accuracy_reject_bad_input():
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0, 1], [0.1])
    with pytest.raises(ValueError, match="finite"):
        auroc([0, 1], [0.1, float("nan")])
    assert accuracy([1, 0, 1, 0], [0.5, 0.49, 0.2, 0.9]) == 0.5
    assert np.isnan(accuracy([], []))


def outcome(label: int, cls: str, p: float, mm: float | None = None) -> SlideOutcome:
    return SlideOutcome(
        path=f"/x/{cls}_{p}.tif",
        label=label,
        lesion_class=cls,
        probability=p,
        pixels_processed=2_803_584,
        pixels_read=1_000_000 * (1 + label),
        seconds=0.5,
        lesion_mm=mm,
    )


def test_largest_lesion_is_the_longer_side_of_the_largest_box_in_mm():
    boxes = [(100, 100, 300, 150), (0, 0, 50, 1000)]
    assert largest_lesion_mm(boxes, (0.5, 0.25)) == pytest.approx(0.25)  # 1000 px × 0.25 µm
    assert largest_lesion_mm(boxes, (2.0, 0.1)) == pytest.approx(0.4)  # 200 px × 2 µm
    assert largest_lesion_mm([], (0.5, 0.5)) is None
    assert largest_lesion_mm(boxes, None) is None


def test_roi_in_lesion_is_the_best_single_roi_fraction_inside_a_lesion_box():
    lesions = [(100, 100, 200, 200), (1000, 1000, 1100, 1400)]
    rois = np.array(
        [
            [150, 150, 250, 250],  # a quarter inside lesion 1
            [1000, 1000, 1100, 1100],  # wholly inside lesion 2
            [0, 0, 50, 50],
        ]
    )  # outside
    assert roi_in_lesion(rois, lesions) == pytest.approx(1.0)
    assert roi_in_lesion(rois[[0, 2]], lesions) == pytest.approx(0.25)
    assert roi_in_lesion(rois[[2]], lesions) == 0.0
    # a region straddling two boxes counts each box on its own: 2 × 40% is not 80%
    assert roi_in_lesion(
        np.array([[0, 0, 100, 100]]), [(0, 0, 40, 100), (60, 0, 100, 100)]
    ) == pytest.approx(0.4)
    assert roi_in_lesion(np.array([[5, 5, 5, 9]]), lesions) == 0.0  # empty ROI
    assert roi_in_lesion(rois, []) is None
    assert roi_in_lesion(np.zeros((0, 4)), lesions) is None


def test_summary_reports_how_often_the_model_looked_at_the_lesion():
    negatives = [outcome(0, "negative", 0.1), outcome(0, "negative", 0.4)]
    micro = [
        outcome(1, "micro", 0.9),
        outcome(1, "micro", 0.3),
        outcome(1, "micro", 0.2),
        outcome(1, "micro", 0.5),
    ]
    for o, inside in zip(micro, (0.9, 0.5, 0.1, None)):
        o.roi_in_lesion = inside
    rows = {r["group"]: r for r in summarize(negatives + micro)}
    assert rows["micro"]["roi_on_lesion"] == pytest.approx(2 / 3)  # 0.9 and 0.5 of 3 known
    assert np.isnan(rows["negative"]["roi_on_lesion"])
    table = markdown_table(list(rows.values()))
    assert "| ROI on lesion |" in table.splitlines()[0]
    # AUROC: 0.9 and 0.5 beat both negatives, 0.3 and 0.2 beat 0.1 → 6 / 8
    assert "| micro vs negative | 4 | 2 | 0.750 | 0.667 | 0.67 |" in table


def test_summary_groups_positives_by_lesion_size_against_all_negatives():
    negatives = [outcome(0, "negative", p) for p in (0.1, 0.3, 0.5)]
    positives = [
        outcome(1, "itc", 0.2, 0.1),
        outcome(1, "micro", 0.4, 0.3),
        outcome(1, "micro", 0.6, 0.7),
        outcome(1, "micro", 0.05, 0.99),
        outcome(1, "micro", 0.9, 1.0),
        outcome(1, "macro", 0.95, 5.0),
        outcome(1, "micro", 0.8),
    ]  # no size known: in its class row only
    rows = {r["group"]: r for r in summarize(negatives + positives)}
    assert list(rows) == [
        "all",
        "itc",
        "micro",
        "macro",
        "lesion < 0.2 mm",
        "lesion 0.2–0.5 mm",
        "lesion 0.5–1 mm",
        "lesion 1–2 mm",
        "lesion ≥ 2 mm",
        "negative",
    ]
    assert rows["micro"]["n_positive"] == 5
    assert rows["lesion 0.5–1 mm"]["n_positive"] == 2  # 0.7 and 0.99 mm
    assert rows["lesion 0.5–1 mm"]["n_negative"] == 3
    # 0.6 beats 0.1, 0.3, 0.5; 0.05 beats none → 3 / 6
    assert rows["lesion 0.5–1 mm"]["auroc"] == pytest.approx(3 / 6)
    assert rows["lesion 1–2 mm"]["auroc"] == 1.0 and rows["lesion 1–2 mm"]["n_positive"] == 1
    assert rows["lesion < 0.2 mm"]["auroc"] == pytest.approx(1 / 3)
    table = markdown_table(list(rows.values()))
    assert "| lesion 0.2–0.5 mm vs negative | 1 | 3 |" in table


def test_summary_has_a_row_per_class_against_all_negatives():
    outcomes = [
        outcome(0, "negative", 0.1),
        outcome(0, "negative", 0.6),
        outcome(0, "negative", 0.3),
        outcome(1, "macro", 0.9),
        outcome(1, "macro", 0.7),
        outcome(1, "micro", 0.2),
        outcome(1, "micro", 0.6),
    ]
    rows = {r["group"]: r for r in summarize(outcomes)}
    assert list(rows) == ["all", "micro", "macro", "negative"]
    assert rows["macro"]["n_positive"] == 2 and rows["macro"]["n_negative"] == 3
    assert rows["macro"]["auroc"] == 1.0
    # micro 0.2 beats 0.1 only; 0.6 beats 0.1, 0.3 and ties 0.6 → (1 + 2.5) / 6
    assert rows["micro"]["auroc"] == pytest.approx(3.5 / 6)
    assert rows["all"]["auroc"] == pytest.approx((2 * 3 + 3.5) / 12)
    assert rows["micro"]["accuracy"] == pytest.approx(3 / 5)  # 0.6 ✓, 0.2 ✗, negs 2/3
    assert rows["negative"]["accuracy"] == pytest.approx(2 / 3)
    assert np.isnan(rows["negative"]["auroc"])
    assert rows["macro"]["mean_pixels_read"] == pytest.approx((2 * 2e6 + 3 * 1e6) / 5)
    table = markdown_table(summarize(outcomes), title="t")
    assert "| macro vs negative | 2 | 3 | 1.000 |" in table
    assert "| negative (specificity) | 0 | 3 | — |" in table
    assert "2.80 M" in table


def test_evaluate_cohort_uses_magnify_figures(cohort_csv, tmp_path):
    from napari_magnet import magnify, open_slide
    from napari_magnet.engine.types import MagnifyResult

    records = read_cohort(cohort_csv)
    records = [next(r for r in records if r.label == 0), next(r for r in records if r.label == 1)]
    model = load_model("magnet3-lite", device="cpu")
    seen = []
    outcomes = evaluate_cohort(
        records, model, device="cpu", progress=lambda d, t, o: seen.append((d, t))
    )
    assert seen == [(1, 2), (2, 2)]
    with open_slide(records[1].path) as slide:
        items = list(magnify(slide, model, device="cpu"))
    result, final_rois = items[-1], items[-2].boxes
    assert isinstance(result, MagnifyResult)
    assert outcomes[1].probability == pytest.approx(result.probability, abs=1e-6)
    assert outcomes[1].pixels_processed == result.pixels_processed == model.pixels_processed()
    assert outcomes[1].pixels_read == result.pixels_read > 0
    assert len(final_rois) == 18  # magnet3's layer-3 regions
    assert outcomes[1].roi_in_lesion == roi_in_lesion(final_rois, records[1].lesion_boxes)
    assert 0.0 <= outcomes[1].roi_in_lesion <= 1.0
    for record, o in zip(records, outcomes):
        if record.label == 1:  # the cohort's boxes at the slide's µm per pixel
            assert o.lesion_mm == pytest.approx(
                max(max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in record.lesion_boxes)
                * COHORT_MPP
                * 1e-3
            )
        else:
            assert o.lesion_mm is None and o.roi_in_lesion is None
    path = write_report(tmp_path / "r.json", summarize(outcomes), outcomes, {"model": "x"})
    data = json.loads(path.read_text())
    assert data["meta"] == {"model": "x"} and len(data["slides"]) == 2
    assert [s["lesion_mm"] for s in data["slides"]] == [o.lesion_mm for o in outcomes]


def test_evaluate_command_prints_per_class_rows(cohort_csv, tmp_path, capsys):
    records = read_cohort(cohort_csv)
    classes = sorted({r.lesion_class for r in records if r.label == 1})
    out_md = tmp_path / "eval.md"
    code = main(
        [
            "evaluate",
            "--slides",
            str(cohort_csv),
            "--model",
            "ats",
            "--device",
            "cpu",
            "--out",
            str(out_md),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| all | 4 | 4 |" in printed
    for cls in classes:
        assert f"| {cls} vs negative |" in printed
    assert "negative (specificity)" in printed
    text = out_md.read_text()
    assert "| slide | class | largest lesion | ROI in lesion | probability |" in text
    assert text.count(".tif |") == len(records)
    assert "| lesion " in text.split("| slide |")[0]  # size rows in the summary table
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--slides",
                str(cohort_csv),
                "--model",
                "ats",
                "--device",
                "cpu",
                "--out",
                str(out_json),
                "--quiet",
            ]
        )
        == 0
    )
    data = json.loads(out_json.read_text())
    groups = [r["group"] for r in data["summary"]]
    assert groups[0] == "all" and set(classes) <= set(groups)
    assert all(s["pixels_processed"] > 0 and s["seconds"] > 0 for s in data["slides"])


def test_evaluate_command_rejects_a_bad_cohort(cohort_csv, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\n" + f"{cohort_csv.parent / 'slide_0000.tif'},2\n")
    assert main(["evaluate", "--slides", str(bad), "--model", "ats", "--quiet"]) == 2
    assert "unknown label '2'" in capsys.readouterr().err
