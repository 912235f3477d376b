"""Slide cohorts for training and evaluation: the CSV, its validation, splits and a Dataset.

The cohort CSV (the format ``napari-magnet synth --n N`` writes as ``cohort.csv``)::

    path,label,lesion_class,lesion_boxes
    slide_0000.tif,1,macro,"[[3981.4, 1998.9, 4113.2, 2134.6]]"
    slide_0001.tif,0,negative,[]

* ``path`` (required): the slide file, absolute or relative to the CSV's folder.
* ``label`` (required): ``1`` / ``0``; ``positive``/``tumor``/``tumour`` and
  ``negative``/``normal`` are accepted too (any case).
* ``lesion_class`` (optional): ``negative``, ``itc``, ``micro``, ``macro`` (Camelyon's size
  classes) or ``positive`` (a tumour slide of unknown class). Empty means ``negative`` for
  label 0 and ``positive`` for label 1. It must agree with the label.
* ``lesion_boxes`` (optional): a JSON list of level-0 boxes ``[x0, y0, x1, y1]``; kept for
  reference, not used by training (slide labels only, as in the paper).

Other columns are ignored. Every problem found (missing columns, unreadable rows, missing
files, unknown labels or classes, duplicates, a single class) is collected and raised as one
:class:`CohortError` naming the CSV, the row (its line number) and the file, *before* any
slide is opened or any model built.

Imports torch (for the Dataset) but neither napari nor Qt.
"""

from __future__ import annotations

import csv
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io.atomic import atomic_path

__all__ = [
    "LESION_CLASSES",
    "CohortError",
    "SlideRecord",
    "SlidePool",
    "SlideDataset",
    "read_cohort",
    "write_cohort",
    "split_cohort",
    "class_counts",
]

#: Classes a ``lesion_class`` cell may hold; ``positive`` = tumour of unspecified size class.
LESION_CLASSES: tuple[str, ...] = ("negative", "itc", "micro", "macro", "positive")
REQUIRED_COLUMNS: tuple[str, ...] = ("path", "label")
_POSITIVE = {"1", "1.0", "positive", "pos", "tumor", "tumour", "true", "yes"}
_NEGATIVE = {"0", "0.0", "negative", "neg", "normal", "false", "no"}
_MAX_LISTED = 12


class CohortError(ValueError):
    """A cohort CSV (or a split of it) cannot be used; the message names the CSV and rows."""


@dataclass(frozen=True)
class SlideRecord:
    """One row of a cohort CSV.

    Attributes
    ----------
    path : Path
        Absolute slide path.
    label : int
        1 = tumour, 0 = negative.
    lesion_class : str
        One of :data:`LESION_CLASSES`.
    lesion_boxes : tuple of tuple of float
        Level-0 boxes from the CSV (may be empty).
    row : int
        Line number in the CSV (the header is line 1), for messages.
    """

    path: Path
    label: int
    lesion_class: str
    lesion_boxes: tuple[tuple[float, float, float, float], ...] = ()
    row: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "path": str(self.path),
            "label": self.label,
            "lesion_class": self.lesion_class,
            "lesion_boxes": [list(b) for b in self.lesion_boxes],
            "row": self.row,
        }


def _listing(problems: list[str]) -> str:
    head = problems[:_MAX_LISTED]
    more = len(problems) - len(head)
    text = "\n  ".join(head)
    return f"\n  {text}" + (f"\n  … and {more} more" if more > 0 else "")


def _parse_label(text: str) -> int | None:
    value = text.strip().lower()
    if value in _POSITIVE:
        return 1
    if value in _NEGATIVE:
        return 0
    return None


def _parse_boxes(text: str) -> tuple[tuple[float, float, float, float], ...]:
    text = text.strip()
    if not text:
        return ()
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("not a JSON list")
    boxes = []
    for box in data:
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise ValueError(f"box {box!r} is not [x0, y0, x1, y1]")
        values = tuple(float(v) for v in box)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"box {box!r} is not finite")
        boxes.append(values)
    return tuple(boxes)  # type: ignore[return-value]


def read_cohort(
    csv_path: str | os.PathLike,
    *,
    check_files: bool = True,
    require_both_labels: bool = True,
    exclude_classes: Iterable[str] = (),
) -> list[SlideRecord]:
    """Read and validate a cohort CSV.

    Parameters
    ----------
    csv_path : path-like
        The CSV (see the module docstring for its columns).
    check_files : bool
        Check that every slide file exists.
    require_both_labels : bool
        Raise unless both labels occur (after ``exclude_classes``): training and AUROC need
        positives and negatives.
    exclude_classes : iterable of str
        Lesion classes to drop (e.g. ``("itc",)``: the paper's protocol excludes isolated
        tumour cells from training).

    Returns
    -------
    list of SlideRecord
        In CSV order.

    Raises
    ------
    CohortError
        Every problem found, listed with its row number and file.
    """
    path = Path(csv_path)
    excluded = {c.strip().lower() for c in exclude_classes if c.strip()}
    unknown_excluded = sorted(excluded - set(LESION_CLASSES))
    if unknown_excluded:
        raise CohortError(
            f"cannot exclude unknown lesion classes {unknown_excluded}; known: "
            f"{', '.join(LESION_CLASSES)}"
        )
    if not path.is_file():
        raise CohortError(f"{path}: cohort CSV not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CohortError(f"{path}: not a readable CSV ({exc})") from None
    if not header:
        raise CohortError(
            f"{path}: empty CSV (expected a header with the columns {', '.join(REQUIRED_COLUMNS)})"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CohortError(
            f"{path}: missing column(s) {', '.join(missing)}; the header has "
            f"{', '.join(header) or 'nothing'} (required: "
            f"{', '.join(REQUIRED_COLUMNS)}; optional: lesion_class, "
            f"lesion_boxes)"
        )
    base = path.parent
    records: list[SlideRecord] = []
    problems: list[str] = []
    seen: dict[Path, int] = {}
    for i, raw in enumerate(rows):
        line = i + 2
        row = {(k or "").strip(): (v if isinstance(v, str) else "") for k, v in raw.items()}
        if not any(v.strip() for v in row.values()):
            continue  # blank line
        slide = row.get("path", "").strip()
        where = f"row {line} ({slide or 'no path'})"
        if not slide:
            problems.append(f"{where}: empty path")
            continue
        label_text = row.get("label", "")
        label = _parse_label(label_text)
        if label is None:
            problems.append(
                f"{where}: unknown label {label_text!r} (use 0/1, negative/positive "
                f"or normal/tumor)"
            )
            continue
        cls = row.get("lesion_class", "").strip().lower()
        if not cls:
            cls = "positive" if label else "negative"
        if cls not in LESION_CLASSES:
            problems.append(
                f"{where}: unknown lesion_class {cls!r} (known: {', '.join(LESION_CLASSES)})"
            )
            continue
        if (cls == "negative") != (label == 0):
            problems.append(f"{where}: lesion_class {cls!r} contradicts label {label}")
            continue
        try:
            boxes = _parse_boxes(row.get("lesion_boxes", ""))
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: lesion_boxes is not a JSON list of [x0, y0, x1, y1] ({exc})")
            continue
        slide_path = Path(slide).expanduser()
        if not slide_path.is_absolute():
            slide_path = base / slide_path
        slide_path = Path(os.path.abspath(slide_path))
        if check_files and not slide_path.exists():
            problems.append(f"{where}: slide file not found: {slide_path}")
            continue
        if slide_path in seen:
            problems.append(
                f"{where}: duplicate of row {seen[slide_path]} (the same slide "
                f"twice would leak between training and validation)"
            )
            continue
        seen[slide_path] = line
        if cls in excluded:
            continue
        records.append(SlideRecord(slide_path, label, cls, boxes, line))
    if problems:
        raise CohortError(f"{path}: {len(problems)} problem(s):" + _listing(problems))
    if not records:
        raise CohortError(
            f"{path}: no slides"
            + (f" left after excluding {', '.join(sorted(excluded))}" if excluded else "")
        )
    if require_both_labels:
        labels = {r.label for r in records}
        if len(labels) < 2:
            only = "positive (label 1)" if labels == {1} else "negative (label 0)"
            raise CohortError(
                f"{path}: all {len(records)} slides are {only}; training and "
                f"AUROC need both positive and negative slides"
            )
    return records


def write_cohort(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write a cohort CSV that :func:`read_cohort` reads back, atomically.

    Parameters
    ----------
    path : path-like
        The CSV to write (its folder is created when missing; an existing file is replaced).
    rows : iterable of mapping
        One mapping per slide, with the keys

        * ``path``: the slide, absolute or relative to the CSV's folder (written as given);
        * ``label``: ``1`` (tumour) or ``0`` (negative);
        * ``lesion_class`` (optional): one of :data:`LESION_CLASSES`; missing or empty
          leaves the cell empty (read back as ``negative`` / ``positive``);
        * ``lesion_boxes`` (optional): level-0 boxes ``[x0, y0, x1, y1]``, written as a JSON
          list of lists of floats (missing: ``[]``).

        Other keys are ignored, so ``[r.to_dict() for r in read_cohort(...)]`` can be
        written back.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If a row has no path, a label other than 0/1 or an unknown lesion class.

    Notes
    -----
    The columns are ``path,label,lesion_class,lesion_boxes`` (see the module docstring),
    written by :class:`csv.DictWriter` in UTF-8 with ``\\r\\n`` line ends.
    """
    out = []
    for i, row in enumerate(rows):
        slide = os.fspath(row.get("path", ""))
        if not slide:
            raise ValueError(f"rows[{i}]: empty path")
        label = row.get("label")
        if label not in (0, 1):
            raise ValueError(f"rows[{i}] ({slide}): label must be 0 or 1, got {label!r}")
        cls = row.get("lesion_class") or ""
        if cls and cls not in LESION_CLASSES:
            raise ValueError(
                f"rows[{i}] ({slide}): unknown lesion_class {cls!r} (known: "
                f"{', '.join(LESION_CLASSES)})"
            )
        boxes = row.get("lesion_boxes")
        cell = json.dumps([[float(v) for v in box] for box in (() if boxes is None else boxes)])
        out.append({"path": slide, "label": int(label), "lesion_class": cls, "lesion_boxes": cell})
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "lesion_class", "lesion_boxes"])
        writer.writeheader()
        writer.writerows(out)
    return Path(path)


def class_counts(records: Sequence[SlideRecord]) -> dict[str, int]:
    """``{lesion_class: count}`` in :data:`LESION_CLASSES` order (classes present only)."""
    counts = {c: 0 for c in LESION_CLASSES}
    for r in records:
        counts[r.lesion_class] += 1
    return {c: n for c, n in counts.items() if n}


def split_cohort(
    records: Sequence[SlideRecord], val_fraction: float, seed: int, *, where: str = "cohort"
) -> tuple[list[SlideRecord], list[SlideRecord]]:
    """Train/validation split stratified by label and lesion class, deterministic from ``seed``.

    Each label contributes ``round(n · val_fraction)`` slides to validation (at least one
    when ``val_fraction > 0`` and the label has two or more slides), drawn so that its
    lesion classes are represented in proportion (each class shuffled, then the label's
    slides ordered by their relative rank within their class). ``val_fraction == 0`` leaves
    validation empty.

    Raises
    ------
    CohortError
        ``val_fraction`` outside ``[0, 1)``, or a split that leaves the training set or (when
        ``val_fraction > 0``) the validation set without one of the labels.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CohortError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xC0407]))
    train: list[SlideRecord] = []
    val: list[SlideRecord] = []
    for label in (0, 1):
        members = [r for r in records if r.label == label]
        if not members:
            continue
        keyed = []
        for cls in LESION_CLASSES:
            group = [r for r in members if r.lesion_class == cls]
            for rank, i in enumerate(rng.permutation(len(group))):
                keyed.append(((rank + 0.5) / len(group), float(rng.random()), group[i]))
        keyed.sort(key=lambda t: (t[0], t[1]))
        k = int(round(len(members) * val_fraction)) if val_fraction > 0 else 0
        if val_fraction > 0 and k == 0 and len(members) >= 2:
            k = 1
        k = min(k, len(members) - 1)
        val += [t[2] for t in keyed[:k]]
        train += [t[2] for t in keyed[k:]]
    train.sort(key=lambda r: r.row)
    val.sort(key=lambda r: r.row)
    if {r.label for r in train} != {0, 1}:
        raise CohortError(
            f"{where}: the training split has only label(s) "
            f"{sorted({r.label for r in train})}; add slides of both labels"
        )
    if val_fraction > 0 and {r.label for r in val} != {0, 1}:
        raise CohortError(
            f"{where}: a validation fraction of {val_fraction} leaves the "
            f"validation split without both labels ({len(val)} slides; each "
            f"label needs at least 2 slides); add slides or use "
            f"--val-fraction 0"
        )
    return train, val


# ----------------------------------------------------------------------------- reading slides


class SlidePool:
    """Thread-safe LRU of open slides, each with its :class:`~.regions.RegionReader`.

    Parameters
    ----------
    max_open : int
        Slides kept open at once (least recently used ones are closed).
    cache_bytes : int
        Decoded-tile cache of each open slide.
    rule : str
        Pyramid level rule of the readers.
    workers : int
        Reading threads per slide.

    The pool is created lazily and dropped when pickled, so a Dataset holding one can go to
    DataLoader worker processes (each opens its own slides).
    """

    DEFAULT_CACHE_BYTES = 48 * 2**20

    def __init__(
        self,
        max_open: int = 16,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        rule: str = "enough",
        workers: int = 2,
    ) -> None:
        self.max_open = max(int(max_open), 1)
        self.cache_bytes = int(cache_bytes)
        self.rule = rule
        self.workers = int(workers)
        self._open: OrderedDict[Path, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, path: Path):
        """``(slide, reader)`` for ``path``, opening it when needed."""
        from ..slide import open_slide
        from .regions import RegionReader

        with self._lock:
            if path in self._open:
                self._open.move_to_end(path)
                return self._open[path]
        slide = open_slide(path, cache_bytes=self.cache_bytes)
        reader = RegionReader(slide, rule=self.rule, workers=self.workers)
        evicted = []
        with self._lock:
            if path in self._open:  # opened concurrently by another thread
                evicted.append((slide, reader))
                entry = self._open[path]
            else:
                self._open[path] = entry = (slide, reader)
                while len(self._open) > self.max_open:
                    evicted.append(self._open.popitem(last=False)[1])
        for old_slide, old_reader in evicted:
            old_reader.close()
            old_slide.close()
        return entry

    def close(self) -> None:
        """Close every open slide."""
        with self._lock:
            entries = list(self._open.values())
            self._open.clear()
        for slide, reader in entries:
            reader.close()
            slide.close()

    def __enter__(self) -> SlidePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SlideDataset:
    """Layer-1 inputs of each slide: the whole slide letterboxed into a square at each size.

    ``dataset[i]`` is ``{"images": [uint8 (3, s, s) tensor per size], "label": float tensor,
    "index": i}``. It follows the framing of :func:`~.frames.slide_frame` (the square around
    the slide, black outside it), exactly what ``magnify`` feeds layer 1.

    Parameters
    ----------
    records : sequence of SlideRecord
    sizes : sequence of int
        Output sides, e.g. ``(56, 112)`` for MagNet's ``I`` and ``I'``, ``(256,)`` for an
        attention-sampling view. Empty (a model trained from feature bags): ``images`` is
        empty and the slide is never opened.
    pool : SlidePool
        Where slides are opened (shared with the deeper reads of the training loop).
    """

    records: Sequence[SlideRecord]
    sizes: Sequence[int]
    pool: SlidePool = field(default_factory=SlidePool)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        import torch

        from .frames import slide_frame

        record = self.records[index]
        item = {"label": torch.tensor(float(record.label)), "index": torch.tensor(index)}
        if not self.sizes:
            return {"images": [], **item}
        slide, reader = self.pool.get(record.path)
        frame, visible = slide_frame(slide)
        images = []
        for size in self.sizes:
            batch = reader.read(frame, int(size), visible)
            images.append(torch.from_numpy(batch.images[0]).permute(2, 0, 1).contiguous())
        return {"images": images, **item}
