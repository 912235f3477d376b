"""What a run reports: ``metrics.csv``, ``learning_curve.png``, console lines, exports."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...io.atomic import atomic_path, atomic_write_text
from .options import TrainOptions
from .state import STATE_JSON

__all__ = ["export_model", "finite_metrics", "log", "plot_learning_curve", "warn", "write_metrics"]

_BASE_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_auroc",
    "val_accuracy",
    "train_auroc",
    "lr",
    "seconds",
    "cpu_seconds",
    "steps",
]


def log(options: TrainOptions, text: str) -> None:
    """Print ``text`` on stderr unless the run is quiet (``options.progress`` false)."""
    if options.progress:
        print(text, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """Print ``warning: text`` on stderr (always)."""
    print(f"warning: {text}", file=sys.stderr, flush=True)


def finite_metrics(metric: dict[str, Any]) -> dict[str, Any]:
    """``metric`` with non-finite floats (no validation: NaN) as ``None``."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metric.items()
    }


def write_metrics(path: Path, history: list[dict]) -> None:
    """Write the history as CSV, atomically.

    Parameters
    ----------
    path : Path
        ``metrics.csv``.
    history : list of dict
        One row per epoch: the base columns first, then every other key (sorted); floats
        with 6 significant digits, NaN as an empty cell.
    """
    extra = sorted({k for row in history for k in row} - set(_BASE_COLUMNS))
    columns = _BASE_COLUMNS + extra
    lines = [",".join(columns)]
    for row in history:
        cells = []
        for c in columns:
            v = row.get(c, "")
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else f"{v:.6g}")
            else:
                cells.append(str(v))
        lines.append(",".join(cells))
    atomic_write_text(path, "\n".join(lines) + "\n")


def plot_learning_curve(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Draw losses (left) and validation AUROC / accuracy (right) per epoch into a PNG.

    Pure PIL (no plotting library needed); non-finite values are left out.

    Parameters
    ----------
    history : sequence of dict
        One row per epoch (``epoch``, ``train_loss``, ``val_loss``, ``val_auroc``,
        ``val_accuracy``, ``train_auroc``).
    path : path
        The PNG, written atomically.
    title : str
        Drawn at the top left.

    Returns
    -------
    Path
        ``path``.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = 960, 400
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    epochs = [int(r["epoch"]) for r in history]
    draw.text((12, 6), title or "learning curve", fill="black", font=font)

    def finite(values):
        return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]

    def panel(x0, y0, x1, y1, series, y_range, label):
        lo, hi = y_range
        if hi <= lo:
            hi = lo + 1.0
        e_lo, e_hi = (min(epochs), max(epochs)) if epochs else (0, 1)
        if e_hi == e_lo:
            e_lo, e_hi = e_lo - 1, e_hi + 1

        def px(e, v):
            return (
                x0 + (e - e_lo) / (e_hi - e_lo) * (x1 - x0),
                y1 - (v - lo) / (hi - lo) * (y1 - y0),
            )

        for i in range(5):  # y ticks
            v = lo + (hi - lo) * i / 4
            _, y = px(e_lo, v)
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.line([x0 + 1, y, x1 - 1, y], fill=(230, 230, 230))
            draw.text((x0 - 44, y - 6), f"{v:.3g}", fill="black", font=font)
        ticks = sorted(set(np.linspace(e_lo, e_hi, min(6, e_hi - e_lo + 1)).round().astype(int)))
        for e in ticks:
            x, _ = px(e, lo)
            draw.line([x, y1, x, y1 + 4], fill="black")
            draw.text((x - 4, y1 + 6), str(e), fill="black", font=font)
        draw.text(((x0 + x1) / 2 - 16, y1 + 20), "epoch", fill="black", font=font)
        draw.text((x0, y0 - 16), label, fill="black", font=font)
        draw.rectangle([x0, y0, x1, y1], outline="black")
        legend_y = y0 + 6
        for name, values, colour in series:
            pts = [
                px(e, v)
                for e, v in zip(epochs, values)
                if isinstance(v, (int, float)) and math.isfinite(v)
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for x, y in pts:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if pts:
                draw.line([x1 - 120, legend_y + 6, x1 - 100, legend_y + 6], fill=colour, width=2)
                draw.text((x1 - 96, legend_y), name, fill="black", font=font)
                legend_y += 14

    train_loss = [r.get("train_loss", float("nan")) for r in history]
    val_loss = [r.get("val_loss", float("nan")) for r in history]
    losses = finite(train_loss + val_loss)
    lo, hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    panel(
        70,
        40,
        450,
        340,
        [("train loss", train_loss, (31, 119, 180)), ("val loss", val_loss, (255, 127, 14))],
        (max(lo - pad, 0.0), hi + pad),
        "loss",
    )
    panel(
        560,
        40,
        940,
        340,
        [
            ("val AUROC", [r.get("val_auroc", float("nan")) for r in history], (44, 160, 44)),
            ("val accuracy", [r.get("val_accuracy", float("nan")) for r in history], (214, 39, 40)),
            ("train AUROC", [r.get("train_auroc", float("nan")) for r in history], (148, 103, 189)),
        ],
        (0.0, 1.0),
        "AUROC / accuracy",
    )
    out = Path(path)
    with atomic_path(out) as tmp:
        img.save(tmp, format="PNG")
    return out


def export_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    notes: str = "",
    extra: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Copy a model checkpoint to ``dst``, re-recording its provenance.

    E.g. to ship a trained run as the demo model. When ``src`` lies in a training run
    folder, the run's budget goes into the provenance too: ``training_run`` with the epochs,
    the summed wall and CPU seconds and the options.

    Parameters
    ----------
    src : path
        A model checkpoint (``.safetensors``, its ``.json`` or the stem).
    dst : path
        Where the copy goes (``.safetensors`` + ``.json``).
    notes : str
        The provenance's notes.
    extra : dict, optional
        More provenance (JSON-ready), merged last.

    Returns
    -------
    tuple of Path
        The written weights and JSON files.

    Raises
    ------
    CheckpointError
        ``src`` is not a readable checkpoint.
    """
    from ...models.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint

    ck = read_checkpoint(src)
    model = load_checkpoint(src)
    provenance = dict(ck.meta.get("provenance", {}))
    for key in (
        "package",
        "package_version",
        "created",
        "torch_version",
        "python_version",
        "notes",
    ):
        provenance.pop(key, None)
    state = ck.weights_path.parent / STATE_JSON
    if state.is_file():
        meta = json.loads(state.read_text(encoding="utf-8"))
        history = meta.get("history", [])
        provenance["training_run"] = {
            "epochs": meta.get("epoch"),
            "best": meta.get("best"),
            "wall_seconds": round(sum(r.get("seconds", 0.0) for r in history), 1),
            "cpu_seconds": round(sum(r.get("cpu_seconds", 0.0) for r in history), 1),
            "options": {
                k: v
                for k, v in meta.get("options", {}).items()
                if k not in ("progress", "out", "resume")
            },
            "train_slides": len(meta.get("split", {}).get("train", [])),
            "val_slides": len(meta.get("split", {}).get("val", [])),
        }
    provenance.update(extra or {})
    return save_checkpoint(model, dst, notes=notes, extra=provenance, model_name=ck.model_name)
