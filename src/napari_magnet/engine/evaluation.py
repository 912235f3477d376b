"""Slide-level evaluation: AUROC and accuracy overall and per lesion class, pixels, time.

Every slide goes through :func:`~napari_magnet.engine.magnify.magnify`, the same stream the
viewer and ``napari-magnet magnify`` use, so the figures are those of the product (pixels
processed per slide in the paper's sense, pixels read from disk, seconds per slide).

Per lesion class, the AUROC compares that class's positive slides with **all** negative
slides (Camelyon's convention for macro/micro/ITC figures); the accuracy is over the same
slides at the 0.5 threshold. When the cohort gives lesion boxes and the slides their µm per
pixel, positives are also grouped by the size of their largest lesion (its box's longer side,
bins at 0.2, 0.5, 1 and 2 mm), each group against all negatives: a pathologist reading a
detector's figures asks how small a lesion it still finds. With lesion boxes, each positive
group also reports how often the model *looked* at the lesion: the fraction of its slides
where at least one final ROI (the last magnifying layer's regions, or the sampled patches)
lies at least half inside a lesion box. A slide that is missed although an ROI was on the
lesion is the classifier's error; one missed with no ROI there is the attention's.

The AUROC is the rank form of the Mann–Whitney U statistic, in numpy, with tied scores given
their average rank (a tie between a positive and a negative counts one half).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_json, atomic_write_text
from .cohort import LESION_CLASSES, SlideRecord

__all__ = [
    "SlideOutcome",
    "SIZE_BINS_MM",
    "accuracy",
    "auroc",
    "evaluate_cohort",
    "largest_lesion_mm",
    "roi_in_lesion",
    "markdown_table",
    "summarize",
    "write_report",
]


def _rank_average(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    ``AUROC = (R₊ − n₊(n₊ + 1)/2) / (n₊ n₋)`` with ``R₊`` the sum of the positives' ranks
    among all scores (average ranks for ties): the probability that a random positive
    scores higher than a random negative, ties counting one half.

    Returns ``nan`` when either class is absent.

    Raises
    ------
    ValueError
        Labels other than 0/1, lengths that differ, or non-finite scores.
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape[0]}) and scores ({s.shape[0]}) differ in length")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rank_average(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def accuracy(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> float:
    """Fraction of slides with ``(score >= threshold) == label``; ``nan`` for no slides."""
    y = np.asarray(labels).reshape(-1).astype(int)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.shape[0]}) and scores ({s.shape[0]}) differ in length")
    if y.size == 0:
        return float("nan")
    return float(((s >= threshold).astype(int) == y).mean())


@dataclass
class SlideOutcome:
    """One slide's evaluation.

    ``lesion_mm`` is the longer side, in mm, of the slide's largest lesion box (None when the
    cohort gives no boxes or the slide no µm per pixel). ``roi_in_lesion`` is
    :func:`roi_in_lesion` of the run's final ROIs (None without lesion boxes or ROIs).
    """

    path: str
    label: int
    lesion_class: str
    probability: float
    pixels_processed: int
    pixels_read: int
    seconds: float
    lesion_mm: float | None = None
    roi_in_lesion: float | None = None


# An ROI is "on the lesion" when at least this fraction of its area lies inside a lesion box.
ROI_ON_LESION = 0.5


def roi_in_lesion(rois: np.ndarray, lesion_boxes: Sequence[Sequence[float]]) -> float | None:
    """The largest fraction of one ROI's area that lies inside one lesion box.

    Parameters
    ----------
    rois : np.ndarray
        ``(N, 4)`` level-0 ``(x0, y0, x1, y1)`` boxes.
    lesion_boxes : sequence of 4-sequences
        Level-0 lesion boxes.

    Returns
    -------
    float or None
        In ``[0, 1]``; None when there are no ROIs or no lesion boxes.
    """
    rois = np.asarray(rois, dtype=np.float64).reshape(-1, 4)
    if not len(rois) or not lesion_boxes:
        return None
    lesions = np.asarray(lesion_boxes, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(rois[:, None, 0], lesions[None, :, 0])
    y0 = np.maximum(rois[:, None, 1], lesions[None, :, 1])
    x1 = np.minimum(rois[:, None, 2], lesions[None, :, 2])
    y1 = np.minimum(rois[:, None, 3], lesions[None, :, 3])
    inside = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(area[:, None] > 0, inside / area[:, None], 0.0)
    return float(frac.max())


SIZE_BINS_MM = (0.2, 0.5, 1.0, 2.0)


def largest_lesion_mm(
    boxes: Sequence[Sequence[float]], mpp: tuple[float, float] | None
) -> float | None:
    """Longer side in mm of the largest of level-0 ``(x0, y0, x1, y1)`` boxes at ``mpp`` µm/px.

    None when there are no boxes or no ``mpp``.
    """
    if not boxes or not mpp:
        return None
    mpp_x, mpp_y = mpp
    return max(max(abs(x1 - x0) * mpp_x, abs(y1 - y0) * mpp_y) for x0, y0, x1, y1 in boxes) / 1000.0


def _size_bin(mm: float) -> str:
    edges = SIZE_BINS_MM
    if mm < edges[0]:
        return f"< {edges[0]:g} mm"
    for lo, hi in zip(edges, edges[1:]):
        if mm < hi:
            return f"{lo:g}–{hi:g} mm"
    return f"≥ {edges[-1]:g} mm"


def evaluate_cohort(
    records: Sequence[SlideRecord],
    model,
    device: str = "auto",
    *,
    rule: str = "enough",
    seed: int = 0,
    progress: Callable[[int, int, SlideOutcome], None] | None = None,
) -> list[SlideOutcome]:
    """Run ``model`` on every slide through :func:`magnify` and collect the outcomes.

    Parameters
    ----------
    records : sequence of SlideRecord
        From :func:`~.cohort.read_cohort`.
    model : torch.nn.Module
        From :func:`~napari_magnet.models.registry.load_model`.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``.
    rule : {"enough", "paper"}
        Pyramid level rule.
    seed : int
        Sampling seed (attention sampling); the same for every slide, as in ``magnify``.
    progress : callable, optional
        ``progress(done, total, outcome)`` after each slide.
    """
    from ..slide import open_slide
    from .magnify import magnify
    from .types import MagnifyResult

    outcomes: list[SlideOutcome] = []
    for i, record in enumerate(records):
        result = None
        final_rois = np.zeros((0, 4))
        with open_slide(record.path) as slide:
            for item in magnify(slide, model, device=device, rule=rule, seed=seed):
                if isinstance(item, MagnifyResult):
                    result = item
                else:
                    final_rois = item.boxes
            lesion_mm = largest_lesion_mm(record.lesion_boxes, slide.mpp)
        assert result is not None
        outcome = SlideOutcome(
            path=str(record.path),
            label=record.label,
            lesion_class=record.lesion_class,
            probability=float(result.probability),
            pixels_processed=int(result.pixels_processed),
            pixels_read=int(result.pixels_read),
            seconds=float(result.seconds),
            lesion_mm=lesion_mm,
            roi_in_lesion=roi_in_lesion(final_rois, record.lesion_boxes),
        )
        outcomes.append(outcome)
        if progress is not None:
            progress(i + 1, len(records), outcome)
    return outcomes


def _row(group: str, members: list[SlideOutcome], threshold: float) -> dict:
    labels = np.array([o.label for o in members], dtype=int)
    probs = np.array([o.probability for o in members], dtype=np.float64)
    looked = [
        o.roi_in_lesion >= ROI_ON_LESION
        for o in members
        if o.label == 1 and o.roi_in_lesion is not None
    ]
    return {
        "group": group,
        "n_positive": int(labels.sum()),
        "n_negative": int(len(labels) - labels.sum()),
        "auroc": auroc(labels, probs) if len(members) else float("nan"),
        "accuracy": accuracy(labels, probs, threshold),
        "mean_pixels_processed": float(np.mean([o.pixels_processed for o in members]))
        if members
        else float("nan"),
        "mean_pixels_read": float(np.mean([o.pixels_read for o in members]))
        if members
        else float("nan"),
        "mean_seconds": float(np.mean([o.seconds for o in members])) if members else float("nan"),
        "roi_on_lesion": float(np.mean(looked)) if looked else float("nan"),
    }


def summarize(outcomes: Sequence[SlideOutcome], threshold: float = 0.5) -> list[dict]:
    """Rows ``all``, one per positive lesion class (vs all negatives), one per lesion size
    (``lesion 0.5–1 mm`` …, vs all negatives; only sizes that positives with a known
    ``lesion_mm`` fall in), then ``negative``.

    Each row: ``group``, ``n_positive``, ``n_negative``, ``auroc`` (``nan`` when a class is
    absent), ``accuracy``, ``mean_pixels_processed``, ``mean_pixels_read``,
    ``mean_seconds``, ``roi_on_lesion`` (the fraction of the group's positives with a final
    ROI at least half inside a lesion box; ``nan`` without boxes). The ``negative`` row's
    accuracy is the specificity; its AUROC is ``nan``.
    """
    outcomes = list(outcomes)
    negatives = [o for o in outcomes if o.label == 0]
    rows = [_row("all", outcomes, threshold)]
    for cls in LESION_CLASSES:
        if cls == "negative":
            continue
        positives = [o for o in outcomes if o.label == 1 and o.lesion_class == cls]
        if positives:
            rows.append(_row(cls, positives + negatives, threshold))
    by_size: dict[str, list[SlideOutcome]] = {}
    for o in outcomes:
        if o.label == 1 and o.lesion_mm is not None:
            by_size.setdefault(_size_bin(o.lesion_mm), []).append(o)
    for size in (_size_bin(lo) for lo in (0.0, *SIZE_BINS_MM)):  # smallest first
        if size in by_size:
            rows.append(_row(f"lesion {size}", by_size[size] + negatives, threshold))
    if negatives:
        row = _row("negative", negatives, threshold)
        rows.append(row)
    return rows


def _fmt(value: float, digits: int = 3) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _fmt_pixels(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value / 1e6:.2f} M"


def markdown_table(rows: Sequence[dict], title: str | None = None) -> str:
    """The summary as a Markdown table (one line per row of :func:`summarize`)."""
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append(
        "| slides | positives | negatives | AUROC | accuracy | ROI on lesion "
        "| pixels processed / slide | pixels read / slide | s / slide |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = {"all": "all", "negative": "negative (specificity)"}.get(
            r["group"], f"{r['group']} vs negative"
        )
        lines.append(
            f"| {name} | {r['n_positive']} | {r['n_negative']} | {_fmt(r['auroc'])} | "
            f"{_fmt(r['accuracy'])} | {_fmt(r.get('roi_on_lesion', float('nan')), 2)} | "
            f"{_fmt_pixels(r['mean_pixels_processed'])} | "
            f"{_fmt_pixels(r['mean_pixels_read'])} | {_fmt(r['mean_seconds'], 2)} |"
        )
    return "\n".join(lines) + "\n"


def write_report(
    path: str | os.PathLike,
    rows: Sequence[dict],
    outcomes: Sequence[SlideOutcome],
    meta: dict | None = None,
) -> Path:
    """Write the evaluation to ``path``: ``.md`` (the table and the per-slide list) or JSON.

    Any other suffix writes JSON. NaN values become ``null`` in JSON (numpy values are
    converted: :func:`~napari_magnet.io.atomic.json_safe`). The file is written atomically and
    its folder created when missing.
    """
    out = Path(path)
    meta = dict(meta or {})
    if out.suffix.lower() in (".md", ".markdown"):
        lines = [f"# Evaluation of {meta.get('model', 'a model')}", ""]
        for key, value in meta.items():
            lines.append(f"- {key}: {value}")
        lines += [
            "",
            markdown_table(rows),
            "",
            "| slide | class | largest lesion | "
            "ROI in lesion | probability | pixels processed | pixels read | s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for o in outcomes:
            size = "—" if o.lesion_mm is None else f"{o.lesion_mm:.2f} mm"
            inside = "—" if o.roi_in_lesion is None else f"{o.roi_in_lesion:.0%}"
            lines.append(
                f"| {Path(o.path).name} | {o.lesion_class} | {size} | {inside} | "
                f"{o.probability:.3f} | {o.pixels_processed:,} | {o.pixels_read:,} | "
                f"{o.seconds:.2f} |"
            )
        return atomic_write_text(out, "\n".join(lines) + "\n")
    return atomic_write_json(
        out,
        {"meta": meta, "summary": list(rows), "slides": [asdict(o) for o in outcomes]},
        indent=1,
    )
