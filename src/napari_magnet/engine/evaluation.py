"""Slide-level evaluation: AUROC and accuracy overall and per lesion class, pixels, time.

Every slide goes through :func:`~napari_magnet.engine.magnify.magnify`, the same stream the
viewer and ``napari-magnet magnify`` use, so the figures are those of the product (pixels
processed per slide in the paper's sense, pixels read from disk, seconds per slide).

Per lesion class, the AUROC compares that class's positive slides with **all** negative
slides (Camelyon's convention for macro/micro/ITC figures); the accuracy is over the same
slides at the 0.5 threshold.

The AUROC is the rank form of the Mann–Whitney U statistic, in numpy, with tied scores given
their average rank (a tie between a positive and a negative counts one half).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cohort import LESION_CLASSES, SlideRecord

__all__ = [
    "SlideOutcome",
    "accuracy",
    "auroc",
    "evaluate_cohort",
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


def accuracy(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
             threshold: float = 0.5) -> float:
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
    """One slide's evaluation."""

    path: str
    label: int
    lesion_class: str
    probability: float
    pixels_processed: int
    pixels_read: int
    seconds: float


def evaluate_cohort(records: Sequence[SlideRecord], model, device: str = "auto", *,
                    rule: str = "enough", seed: int = 0,
                    progress: Callable[[int, int, SlideOutcome], None] | None = None
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
        with open_slide(record.path) as slide:
            for item in magnify(slide, model, device=device, rule=rule, seed=seed):
                if isinstance(item, MagnifyResult):
                    result = item
        assert result is not None
        outcome = SlideOutcome(
            path=str(record.path), label=record.label, lesion_class=record.lesion_class,
            probability=float(result.probability), pixels_processed=int(result.pixels_processed),
            pixels_read=int(result.pixels_read), seconds=float(result.seconds))
        outcomes.append(outcome)
        if progress is not None:
            progress(i + 1, len(records), outcome)
    return outcomes


def _row(group: str, members: list[SlideOutcome], threshold: float) -> dict:
    labels = np.array([o.label for o in members], dtype=int)
    probs = np.array([o.probability for o in members], dtype=np.float64)
    return {
        "group": group,
        "n_positive": int(labels.sum()),
        "n_negative": int(len(labels) - labels.sum()),
        "auroc": auroc(labels, probs) if len(members) else float("nan"),
        "accuracy": accuracy(labels, probs, threshold),
        "mean_pixels_processed": float(np.mean([o.pixels_processed for o in members]))
        if members else float("nan"),
        "mean_pixels_read": float(np.mean([o.pixels_read for o in members]))
        if members else float("nan"),
        "mean_seconds": float(np.mean([o.seconds for o in members])) if members
        else float("nan"),
    }


def summarize(outcomes: Sequence[SlideOutcome], threshold: float = 0.5) -> list[dict]:
    """Rows ``all``, one per positive lesion class (vs all negatives), then ``negative``.

    Each row: ``group``, ``n_positive``, ``n_negative``, ``auroc`` (``nan`` when a class is
    absent), ``accuracy``, ``mean_pixels_processed``, ``mean_pixels_read``,
    ``mean_seconds``. The ``negative`` row's accuracy is the specificity; its AUROC is
    ``nan``.
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
    if negatives:
        row = _row("negative", negatives, threshold)
        rows.append(row)
    return rows


def _fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _fmt_pixels(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value / 1e6:.2f} M"


def markdown_table(rows: Sequence[dict], title: str | None = None) -> str:
    """The summary as a Markdown table (one line per row of :func:`summarize`)."""
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| slides | positives | negatives | AUROC | accuracy | pixels processed / slide "
                 "| pixels read / slide | s / slide |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = {"all": "all", "negative": "negative (specificity)"}.get(
            r["group"], f"{r['group']} vs negative")
        lines.append(f"| {name} | {r['n_positive']} | {r['n_negative']} | {_fmt(r['auroc'])} | "
                     f"{_fmt(r['accuracy'])} | {_fmt_pixels(r['mean_pixels_processed'])} | "
                     f"{_fmt_pixels(r['mean_pixels_read'])} | {_fmt(r['mean_seconds'], 2)} |")
    return "\n".join(lines) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(path: str | os.PathLike, rows: Sequence[dict],
                 outcomes: Sequence[SlideOutcome], meta: dict | None = None) -> Path:
    """Write the evaluation to ``path``: ``.md`` (the table and the per-slide list) or JSON.

    Any other suffix writes JSON. NaN values become ``null`` in JSON.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if out.suffix.lower() in (".md", ".markdown"):
        lines = [f"# Evaluation of {meta.get('model', 'a model')}", ""]
        for key, value in meta.items():
            lines.append(f"- {key}: {value}")
        lines += ["", markdown_table(rows), "", "| slide | class | probability | pixels "
                  "processed | pixels read | s |", "|---|---|---|---|---|---|"]
        for o in outcomes:
            lines.append(f"| {Path(o.path).name} | {o.lesion_class} | {o.probability:.3f} | "
                         f"{o.pixels_processed:,} | {o.pixels_read:,} | {o.seconds:.2f} |")
        text = "\n".join(lines) + "\n"
    else:
        text = json.dumps(_json_safe({"meta": meta, "summary": list(rows),
                                      "slides": [asdict(o) for o in outcomes]}), indent=1) + "\n"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
