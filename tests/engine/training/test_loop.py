"""Training end to end (the CLI and train()): every family trains, warm starts, errors,
a real learning signal, and options chosen by the model's family."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from napari_magnet.cli import main
from napari_magnet.engine.training import TrainOptions, load_training_state, train
from napari_magnet.engine.training.loop import _is_better
from napari_magnet.models.checkpoints import CheckpointError
from napari_magnet.models.registry import listed_models, load_model
from napari_magnet.synth import SyntheticSlideSpec, generate_slide

from .helpers import check_run_outputs, metrics, train_args


def test_magnet_lite_trains_from_the_cli(cohort_csv, tmp_path):
    run = tmp_path / "lite"
    assert main(train_args(cohort_csv, run, "--model", "magnet3-lite", "--epochs", "2")) == 0
    check_run_outputs(run, 2, "magnet3-lite")
    meta, tensors = load_training_state(run)
    # Adam's state was saved under flattened keys; 2 epochs of 2 steps (6 slides, batch 3)
    steps = {
        float(v) for k, v in tensors.items() if k.startswith("optim.adam.") and k.endswith(".step")
    }
    assert steps == {4.0}
    assert meta["schedule"]["step_count"] == 4 and meta["schedule"]["total_steps"] == 4
    assert meta["optimizers"]["adam"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # the best model is the epoch with the best validation AUROC
    rows = metrics(run)
    best = max(
        rows, key=lambda r: (float(r["val_auroc"]), float(r["val_accuracy"]), -float(r["val_loss"]))
    )
    assert meta["best"]["epoch"] == int(best["epoch"])


@pytest.mark.parametrize("learning", ["expectation", "reinforce"])
def test_ats_trains_from_the_cli(cohort_csv, tmp_path, learning, capsys):
    run = tmp_path / learning
    assert (
        main(
            train_args(
                cohort_csv, run, "--model", "ats", "--epochs", "1", "--ats-learning", learning
            )
        )
        == 0
    )
    check_run_outputs(run, 1, "ats")
    meta, tensors = load_training_state(run)
    assert set(meta["optimizers"]) == {"attention", "classifier"}
    assert meta["optimizers"]["attention"]["param_groups"][0]["betas"] == [0.999, 0.999]
    assert meta["optimizers"]["attention"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    attention_loss = float(metrics(run)[0]["train_attention"])
    if learning == "reinforce":
        assert meta["task"]["reinforce_baseline"] is not None
        assert attention_loss != 0.0
    else:
        assert attention_loss == 0.0
        # a model checkpoint given to --resume starts a new run from its weights
        warm = tmp_path / "warm"
        assert (
            main(
                train_args(
                    cohort_csv, warm, "--epochs", "1", "--resume", str(run / "best.safetensors")
                )
            )
            == 0
        )
        assert "warm start" in capsys.readouterr().err
        assert [int(r["epoch"]) for r in metrics(warm)] == [1]
        assert load_model(warm / "last.json", device="cpu").model_name == "ats"


@pytest.mark.parametrize("learning", ["expectation", "reinforce"])
def test_two_level_ats_trains_from_the_cli(cohort_csv, tmp_path, learning):
    run = tmp_path / learning
    assert (
        main(
            train_args(
                cohort_csv,
                run,
                "--model",
                "ats-2level",
                "--epochs",
                "1",
                "--ats-learning",
                learning,
            )
        )
        == 0
    )
    check_run_outputs(run, 1, "ats-2level")
    meta, tensors = load_training_state(run)
    # the region attention network is trained by the attention optimizer
    before = load_model("ats-2level", device="cpu").state_dict()
    after = load_model(run / "last.safetensors", device="cpu").state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert any(k.startswith("region_attention_net.") for k in changed)
    assert any(k.startswith("attention_net.") for k in changed)
    assert any(k.startswith("feature_net.") for k in changed)
    if learning == "reinforce":
        assert float(metrics(run)[0]["train_attention"]) != 0.0


def test_resume_errors(cohort_csv, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train(
            TrainOptions(
                slides=cohort_csv,
                out=tmp_path / "r",
                resume=tmp_path / "nothing",
                model="magnet3-lite",
                epochs=1,
                device="cpu",
                progress=False,
            )
        )
    with pytest.raises(ValueError, match="unknown model"):
        train(
            TrainOptions(
                slides=cohort_csv,
                out=tmp_path / "r",
                model="magnet9",
                epochs=1,
                device="cpu",
                progress=False,
            )
        )
    assert not (tmp_path / "r").exists()


def test_loss_decreases_when_overfitting_four_slides(tmp_path):
    """Macro vs negative, 4 slides, no augmentation: several real steps reduce the loss."""
    rows = []
    for i, kind in enumerate(["macro", "negative", "macro", "negative"]):
        spec = SyntheticSlideSpec(2048, 2048, mpp=1.5, seed=100 + i, lesion_kind=kind)
        info = generate_slide(tmp_path / f"s{i}.tif", spec)
        rows.append({"path": info.path.name, "label": info.label, "lesion_class": kind})
    csv_path = tmp_path / "four.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "lesion_class"])
        writer.writeheader()
        writer.writerows(rows)
    result = train(
        TrainOptions(
            slides=csv_path,
            out=tmp_path / "overfit",
            model="magnet3-lite",
            epochs=8,
            batch_size=4,
            lr=3e-3,
            val_fraction=0.0,
            augment=False,
            device="cpu",
            progress=False,
        )
    )
    losses = [r["train_loss"] for r in result.history]
    classification = [r["train_classification"] for r in result.history]
    assert len(losses) == 8
    assert losses[-1] < 0.9 * losses[0], losses
    assert classification[-1] < classification[0], classification
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # no validation: the best model is chosen on the training loss, so it is a late epoch
    assert result.best_epoch >= 6


def test_a_missing_model_lists_the_registered_trainable_models(cohort_csv, tmp_path):
    options = TrainOptions(
        slides=cohort_csv, out=tmp_path / "r", epochs=1, device="cpu", progress=False
    )
    with pytest.raises(ValueError, match="choose a model") as info:
        train(options)
    named = [m for m in listed_models() if m != "demo"]
    listed = str(info.value).split("--model ", 1)[1].rstrip(")").split(", ")
    assert listed and set(listed) <= set(named)
    assert [m for m in named if m in listed] == listed  # in the registry's order
    assert not (tmp_path / "r").exists()


def test_bad_options_are_refused_before_the_cohort_is_read(tmp_path):
    missing = tmp_path / "none.csv"
    for kw, message in [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"lr": 0.0}, "learning rate"),
        ({"rule": "best"}, "rule"),
    ]:
        with pytest.raises(ValueError, match=message):
            train(
                TrainOptions(
                    slides=missing,
                    out=tmp_path / "r",
                    model="magnet3-lite",
                    device="cpu",
                    progress=False,
                    **kw,
                )
            )


def test_the_best_epoch_is_chosen_by_auroc_then_accuracy_then_loss():
    nan = math.nan
    assert _is_better({"val_auroc": 0.5}, None) and _is_better({"val_auroc": 0.5}, {})
    best = {"epoch": 1, "val_auroc": 0.8, "val_accuracy": 0.7, "val_loss": 0.5}
    assert _is_better({"val_auroc": 0.9, "val_accuracy": 0.1, "val_loss": 9.0}, best)
    assert _is_better({"val_auroc": 0.8, "val_accuracy": 0.8, "val_loss": 9.0}, best)
    assert _is_better({"val_auroc": 0.8, "val_accuracy": 0.7, "val_loss": 0.4}, best)
    assert not _is_better({"val_auroc": 0.8, "val_accuracy": 0.7, "val_loss": 0.5}, best)
    # no validation (NaN in the history, None in the saved best): the training loss decides
    no_val = {"val_auroc": nan, "val_accuracy": nan, "val_loss": nan, "train_loss": 0.3}
    saved = {
        "epoch": 2,
        "val_auroc": None,
        "val_accuracy": None,
        "val_loss": None,
        "train_loss": 0.4,
    }
    assert _is_better(no_val, saved)
    assert not _is_better(dict(no_val, train_loss=0.5), saved)
