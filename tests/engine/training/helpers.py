"""Helpers shared by the trainer's tests: CLI arguments, a run's outputs, reference reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from napari_magnet.engine.training import STATE_JSON
from napari_magnet.models.registry import load_model


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def train_args(csv_path: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--slides",
        str(csv_path),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "--lr",
        "1e-3",
        "--val-fraction",
        "0.25",
        "--quiet",
        *extra,
    ]


def check_run_outputs(run: Path, epochs: int, model_name: str) -> None:
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    for r in rows:
        assert np.isfinite(float(r["train_loss"]))
        assert 0.0 <= float(r["val_auroc"]) <= 1.0 and 0.0 <= float(r["val_accuracy"]) <= 1.0
    with Image.open(run / "learning_curve.png") as img:
        assert img.format == "PNG" and img.size[0] > 400
    for name in ("best", "last"):
        model = load_model(run / f"{name}.safetensors", device="cpu")
        assert model.model_name == model_name
    meta = json.loads((run / STATE_JSON).read_text())
    assert meta["epoch"] == epochs and len(meta["history"]) == epochs
    tensors = run / meta["tensors_file"]
    head = tensors.read_bytes()[:16]
    assert head[8:9] == b"{"  # a safetensors header, not a pickle
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])


def letterboxed(reader, frame, visible, size):
    """The slide's start frame as a float image (1, 3, size, size) in [0, 1]."""
    img = reader.read(frame, size, visible).images[0]
    return torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
