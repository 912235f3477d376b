"""What a run reports: metrics.csv, the learning curve, exported checkpoints."""

from __future__ import annotations

import csv
import math

from PIL import Image

from napari_magnet.engine.training import export_model, plot_learning_curve
from napari_magnet.engine.training.report import finite_metrics, write_metrics
from napari_magnet.models.checkpoints import read_checkpoint
from napari_magnet.models.registry import load_model


def test_metrics_csv_puts_the_base_columns_first_and_leaves_nan_empty(tmp_path):
    history = [
        {
            "epoch": 1,
            "train_loss": 0.123456789,
            "val_loss": math.nan,
            "steps": 2,
            "train_zeta": 1.0,
            "train_alpha": 0.5,
        },
        {"epoch": 2, "train_loss": 0.1, "val_loss": math.nan, "steps": 4},
    ]
    path = tmp_path / "metrics.csv"
    write_metrics(path, history)
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[:3] == ["epoch", "train_loss", "val_loss"]
    assert header[-2:] == ["train_alpha", "train_zeta"]
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["train_loss"] == "0.123457" and rows[0]["val_loss"] == ""
    assert rows[1]["train_alpha"] == "" and rows[1]["steps"] == "4"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # nothing temporary left
    assert finite_metrics({"a": math.nan, "b": 0.5, "c": math.inf, "d": 1}) == {
        "a": None,
        "b": 0.5,
        "c": None,
        "d": 1,
    }


def test_learning_curve_draws_partial_and_empty_histories(tmp_path):
    nan = math.nan
    history = [
        {"epoch": 1, "train_loss": 0.7, "val_loss": nan, "val_auroc": nan},
        {
            "epoch": 2,
            "train_loss": 0.5,
            "val_loss": nan,
            "val_auroc": 0.75,
            "val_accuracy": 0.5,
            "train_auroc": 0.6,
        },
    ]
    for name, rows in (("two.png", history), ("one.png", history[:1]), ("none.png", [])):
        out = plot_learning_curve(rows, tmp_path / name, title="t")
        assert out == tmp_path / name
        with Image.open(out) as img:
            assert img.format == "PNG" and img.size == (960, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none.png", "one.png", "two.png"]


def test_export_records_the_runs_budget(one_epoch_run, tmp_path):
    weights, _ = export_model(
        one_epoch_run / "best", tmp_path / "shipped", notes="a demo", extra={"cohort": "synthetic"}
    )
    ck = read_checkpoint(weights)
    provenance = ck.meta["provenance"]
    assert provenance["notes"] == "a demo" and provenance["cohort"] == "synthetic"
    run = provenance["training_run"]
    assert run["epochs"] == 1 and run["best"]["epoch"] == 1
    assert run["train_slides"] > 0 and run["val_slides"] > 0
    assert run["options"]["model"] == "magnet3-lite"
    assert not {"progress", "out", "resume"} & set(run["options"])
    assert ck.model_name == "magnet3-lite"
    assert load_model(weights, device="cpu").model_name == "magnet3-lite"
    # re-exported outside its run folder, the checkpoint keeps the budget it recorded
    again, _ = export_model(weights, tmp_path / "again")
    assert read_checkpoint(again).meta["provenance"]["training_run"] == run
