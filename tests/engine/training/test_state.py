"""The training state: resume after a real Ctrl-C, the commit point, refused states."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from napari_magnet.cli import main
from napari_magnet.engine.training import (
    STATE_DIR,
    STATE_FORMAT,
    STATE_JSON,
    TrainOptions,
    load_training_state,
    train,
)
from napari_magnet.engine.training.state import _optimizer_from, _optimizer_tensors
from napari_magnet.models.checkpoints import CheckpointError, sha256_of

from .helpers import metrics, train_args

EPOCHS = 4  # enough left after epoch 1 that the signal always lands before the end


def test_interrupted_run_resumes_without_losing_or_repeating_epochs(cohort_csv, tmp_path):
    """A real Ctrl-C (SIGINT) after epoch 1, then --resume: same result as no interruption."""
    run = tmp_path / "interrupted"
    args = ("--model", "magnet3-lite", "--epochs", str(EPOCHS), "--no-augment")
    # the same torch threads as this process (a float sum's order depends on them)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_magnet.cli", *train_args(cohort_csv, run, *args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a suite started in the background of a non-interactive shell ignores SIGINT, and
        # the child would inherit that: give it the default, as a terminal's process has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            state = run / STATE_JSON
            if state.exists() and json.loads(state.read_text())["epoch"] == 1:
                break
            time.sleep(0.05)
        time.sleep(0.2)  # into epoch 2, most likely (the check below holds wherever it lands)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    done = json.loads((run / STATE_JSON).read_text())["epoch"]
    assert 1 <= done < EPOCHS
    assert [int(r["epoch"]) for r in metrics(run)] == list(range(1, done + 1))
    before = metrics(run)

    assert main(train_args(cohort_csv, run, *args, "--resume", str(run))) == 0
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert rows[:done] == before  # the completed epochs are kept as they were
    meta, _ = load_training_state(run / STATE_JSON)
    assert meta["epoch"] == EPOCHS and meta["schedule"]["step_count"] == 2 * EPOCHS

    straight = tmp_path / "straight"
    assert main(train_args(cohort_csv, straight, *args)) == 0
    for a, b in zip(metrics(straight), rows, strict=True):
        for key in ("train_loss", "val_loss", "train_classification", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-7), key
    # a finished run asked for no more epochs does nothing
    result = train(
        TrainOptions(
            slides=cohort_csv,
            out=run,
            resume=run,
            epochs=EPOCHS,
            batch_size=3,
            lr=1e-3,
            val_fraction=0.25,
            device="cpu",
            progress=False,
        )
    )
    assert result.epochs_done == EPOCHS and len(metrics(run)) == EPOCHS


def test_the_state_is_safetensors_plus_json_and_nothing_else(one_epoch_run):
    meta, tensors = load_training_state(one_epoch_run)
    assert meta["format"] == STATE_FORMAT and meta["epoch"] == 1
    assert meta["tensors_file"] == f"{STATE_DIR}/epoch-0001.safetensors"
    assert meta["tensors_sha256"] == sha256_of(one_epoch_run / meta["tensors_file"])
    # only the committed epoch's tensors, no temporary files left behind
    assert sorted(p.name for p in (one_epoch_run / STATE_DIR).iterdir()) == [
        "epoch-0001.safetensors"
    ]
    assert not [p for p in one_epoch_run.iterdir() if p.name.endswith(".tmp")]
    assert any(k.startswith("model.") for k in tensors)
    assert any(k.startswith("optim.adam.") for k in tensors)
    assert meta["options"]["model"] == "magnet3-lite"
    assert meta["model"]["name"] == "magnet3-lite"


def test_resuming_leaves_the_callers_options_alone(one_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    options = TrainOptions(
        slides=json.loads((run / STATE_JSON).read_text())["options"]["slides"],
        out=run,
        resume=run,
        epochs=1,
        batch_size=3,
        lr=1e-3,
        val_fraction=0.25,
        device="cpu",
        progress=False,
    )
    before = dataclasses.asdict(options)
    result = train(options)  # nothing to do: the run has its epoch
    assert dataclasses.asdict(options) == before and options.model is None
    assert result.epochs_done == 1 and result.best_epoch == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.epochs_done = 2
    with pytest.raises(ValueError, match="differs from the resumed run's model"):
        train(dataclasses.replace(options, model="ats"))


def test_tampered_pickled_or_missing_states_are_refused(one_epoch_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    meta = json.loads((run / STATE_JSON).read_text())
    tensors = run / meta["tensors_file"]
    original = tensors.read_bytes()
    tensors.write_bytes(original + b" ")
    with pytest.raises(CheckpointError, match="sha256"):
        load_training_state(run)
    tensors.write_bytes(b"\x80\x04" + original[2:])
    with pytest.raises(CheckpointError, match="pickle"):
        load_training_state(run / STATE_JSON)
    tensors.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_training_state(run)
    (run / STATE_JSON).write_text(json.dumps(dict(meta, format="something/1")))
    with pytest.raises(CheckpointError, match="not a napari-magnet training state"):
        load_training_state(run)
    (run / STATE_JSON).write_text("{")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_training_state(run)
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(tmp_path)


def test_optimizer_state_round_trips_through_flat_tensors_and_json():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.5, 0.75))
    for _ in range(2):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    tensors: dict[str, torch.Tensor] = {}
    meta = json.loads(json.dumps(_optimizer_tensors("adam", opt, tensors)))
    assert set(tensors) == {"optim.adam.0.step", "optim.adam.0.exp_avg", "optim.adam.0.exp_avg_sq"}
    other = torch.optim.Adam([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    other.load_state_dict(_optimizer_from("adam", meta, tensors))
    assert other.param_groups[0]["betas"] == (0.5, 0.75)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(other.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])
