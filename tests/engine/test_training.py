"""Training on real synthetic slides: end to end from the CLI, resume after a real Ctrl-C,
a real learning signal, and region reads that follow the augmentation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from napari_magnet.cli import main
from napari_magnet.engine.cohort import SlidePool, read_cohort
from napari_magnet.engine.frames import chain_frames
from napari_magnet.engine.training import (STATE_JSON, CosineSchedule, TrainOptions,
                                           load_training_state, train)
from napari_magnet.models.checkpoints import CheckpointError
from napari_magnet.models.augment import Dihedral
from napari_magnet.models.registry import load_model
from napari_magnet.synth import SyntheticSlideSpec, generate_slide

from .test_cohort import make_cohort


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory)


def metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def train_args(csv_path: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--slides", str(csv_path), "--out", str(out), "--device", "cpu",
            "--batch-size", "3", "--lr", "1e-3", "--val-fraction", "0.25", "--quiet", *extra]


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


def test_magnet_lite_trains_from_the_cli(cohort_csv, tmp_path):
    run = tmp_path / "lite"
    assert main(train_args(cohort_csv, run, "--model", "magnet3-lite", "--epochs", "2")) == 0
    check_run_outputs(run, 2, "magnet3-lite")
    meta, tensors = load_training_state(run)
    # Adam's state was saved under flattened keys; 2 epochs of 2 steps (6 slides, batch 3)
    steps = {float(v) for k, v in tensors.items() if k.startswith("optim.adam.") and
             k.endswith(".step")}
    assert steps == {4.0}
    assert meta["schedule"]["step_count"] == 4 and meta["schedule"]["total_steps"] == 4
    assert meta["optimizers"]["adam"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # the best model is the epoch with the best validation AUROC
    rows = metrics(run)
    best = max(rows, key=lambda r: (float(r["val_auroc"]), float(r["val_accuracy"]),
                                    -float(r["val_loss"])))
    assert meta["best"]["epoch"] == int(best["epoch"])


@pytest.mark.parametrize("learning", ["expectation", "reinforce"])
def test_ats_trains_from_the_cli(cohort_csv, tmp_path, learning, capsys):
    run = tmp_path / learning
    assert main(train_args(cohort_csv, run, "--model", "ats", "--epochs", "1",
                           "--ats-learning", learning)) == 0
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
        assert main(train_args(cohort_csv, warm, "--epochs", "1", "--resume",
                               str(run / "best.safetensors"))) == 0
        assert "warm start" in capsys.readouterr().err
        assert [int(r["epoch"]) for r in metrics(warm)] == [1]
        assert load_model(warm / "last.json", device="cpu").model_name == "ats"


@pytest.mark.parametrize("learning", ["expectation", "reinforce"])
def test_two_level_ats_trains_from_the_cli(cohort_csv, tmp_path, learning):
    run = tmp_path / learning
    assert main(train_args(cohort_csv, run, "--model", "ats-2level", "--epochs", "1",
                           "--ats-learning", learning)) == 0
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


@pytest.mark.parametrize("k,flip", [(1, False), (2, True)])
def test_ats_region_and_patch_reads_follow_the_augmentation(cohort_csv, k, flip):
    """A two-level read at augmented centres shows what the augmented slide shows there."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_magnet.engine.batches import SlideBatch as _Batch
    from napari_magnet.models.ats import ATSTask as _ATSTask

    records = [r for r in read_cohort(cohort_csv) if r.label == 1][:1]
    model = load_model("ats-2level", device="cpu")
    cfg = model.config
    task = _ATSTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    op = Dihedral(k, flip)
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        batch = _Batch(records, pool, [op], threads)
        reader = batch.entries[0][1]
        frame = batch.frames[0]
        size = 1024
        whole = op.apply(_letterboxed(reader, batch.frames[:1], batch.visible[:1], size))
        centres = torch.tensor([[[[0.3, 0.6], [0.55, 0.45]]]])  # (B, 1 parent, 2, 2)
        regions = task._child_frames(batch, [batch.frames[:1]], centres, cfg.region_side)
        got = task._read(batch, regions, cfg.region_size)
        # reference: the augmented whole slide cropped around the same centres
        px = cfg.region_side / (frame[2] - frame[0]) * size
        for i, (cx, cy) in enumerate(centres[0, 0].tolist()):
            x0, y0 = round(cx * size - px / 2), round(cy * size - px / 2)
            crop = whole[:, :, y0:y0 + round(px), x0:x0 + round(px)]
            want = F.interpolate(crop, size=(8, 8), mode="area")
            error = (F.interpolate(got[i:i + 1], size=(8, 8), mode="area") - want).abs().mean()
            assert error < 0.04
        # patches inside an augmented region: the centre of the region is the region's centre
        sub = torch.full((1, 2, 1, 2), 0.5)
        patches = task._child_frames(batch, regions, sub, cfg.patch_side)[0]
        np.testing.assert_allclose((patches[:, :2] + patches[:, 2:]) / 2,
                                   (regions[0][:, :2] + regions[0][:, 2:]) / 2)


def test_interrupted_run_resumes_without_losing_or_repeating_epochs(cohort_csv, tmp_path):
    """A real Ctrl-C (SIGINT) during epoch 2, then --resume: same result as no interruption."""
    run = tmp_path / "interrupted"
    args = train_args(cohort_csv, run, "--model", "magnet3-lite", "--epochs", "2",
                      "--no-augment")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "napari_magnet.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            state = run / STATE_JSON
            if state.exists() and json.loads(state.read_text())["epoch"] == 1:
                break
            time.sleep(0.05)
        time.sleep(0.5)  # into epoch 2
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err
    assert json.loads((run / STATE_JSON).read_text())["epoch"] == 1
    assert [int(r["epoch"]) for r in metrics(run)] == [1]
    first = metrics(run)[0]

    assert main(["train", "--slides", str(cohort_csv), "--out", str(run), "--device", "cpu",
                 "--batch-size", "3", "--lr", "1e-3", "--val-fraction", "0.25", "--quiet",
                 "--epochs", "2", "--no-augment", "--resume", str(run)]) == 0
    rows = metrics(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert rows[0] == first  # the completed epoch is kept as it was
    meta, _ = load_training_state(run / STATE_JSON)
    assert meta["epoch"] == 2 and meta["schedule"]["step_count"] == 4

    straight = tmp_path / "straight"
    assert main(train_args(cohort_csv, straight, "--model", "magnet3-lite", "--epochs", "2",
                           "--no-augment")) == 0
    for a, b in zip(metrics(straight), rows):
        for key in ("train_loss", "val_loss", "train_classification", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-7), key
    # a finished run asked for no more epochs does nothing
    result = train(TrainOptions(slides=cohort_csv, out=run, resume=run, epochs=2,
                                batch_size=3, lr=1e-3, val_fraction=0.25, device="cpu",
                                progress=False))
    assert result.epochs_done == 2 and len(metrics(run)) == 2


def test_resume_errors(cohort_csv, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train(TrainOptions(slides=cohort_csv, out=tmp_path / "r", resume=tmp_path / "nothing",
                           model="magnet3-lite", epochs=1, device="cpu", progress=False))
    with pytest.raises(ValueError, match="unknown model"):
        train(TrainOptions(slides=cohort_csv, out=tmp_path / "r", model="magnet9", epochs=1,
                           device="cpu", progress=False))
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
    result = train(TrainOptions(slides=csv_path, out=tmp_path / "overfit", model="magnet3-lite",
                                epochs=8, batch_size=4, lr=1e-3, val_fraction=0.0,
                                augment=False, device="cpu", progress=False))
    losses = [r["train_loss"] for r in result.history]
    classification = [r["train_classification"] for r in result.history]
    assert len(losses) == 8
    assert losses[-1] < 0.9 * losses[0], losses
    assert classification[-1] < classification[0], classification
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # no validation: the best model is chosen on the training loss, so it is a late epoch
    assert result.best_epoch >= 6


def test_cosine_schedule_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.1)
    sched = CosineSchedule([opt], total_steps=4)
    lrs = [sched.lr()]
    for _ in range(4):
        sched.step()
        lrs.append(sched.lr())
    assert lrs == pytest.approx([0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05,
                                 0.1 * (1 + np.cos(3 * np.pi / 4)) / 2, 0.0])
    other = CosineSchedule([torch.optim.Adam([p], lr=0.1)], total_steps=4)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert other.lr() == pytest.approx(0.0, abs=1e-12) and other.step_count == 4


def _letterboxed(reader, frame, visible, size):
    img = reader.read(frame, size, visible).images[0]
    return torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255


@pytest.mark.parametrize("k,flip", [(0, False), (1, False), (2, True), (3, True)])
def test_region_reads_follow_the_augmentation(cohort_csv, k, flip):
    """read_hi for an augmented forward shows what the augmented slide shows at the θ chain."""
    from napari_magnet.engine.batches import SlideBatch as _Batch
    from napari_magnet.models.magnet import MagNetTask as _MagNetTask
    from concurrent.futures import ThreadPoolExecutor

    records = [r for r in read_cohort(cohort_csv) if r.label == 1][:1]
    model = load_model("magnet3-lite", device="cpu")
    task = _MagNetTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    op = Dihedral(k, flip)
    chain = torch.tensor([[[0.3, 0.0, 0.35], [0.0, 0.3, -0.4]],
                          [[0.5, 0.0, -0.2], [0.0, 0.5, 0.1]]])
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        batch = _Batch(records, pool, [op], threads)
        got = task._read_hi(batch)(2, chain)  # (2, 3, 112, 112)
        plain = _Batch(records, pool, None, threads)
        reader = batch.entries[0][1]
        whole = _letterboxed(reader, batch.frames[:1], batch.visible[:1], 2048)
        # reference: sample the augmented whole slide at the chain
        grid = F.affine_grid(chain, [2, 3, 112, 112], align_corners=False)
        want = F.grid_sample(op.apply(whole).expand(2, -1, -1, -1), grid, mode="bilinear",
                             align_corners=False)
        # compare at 14 x 14 (the texture aliases differently in the two resamplings)
        def low(x):
            return F.avg_pool2d(x, 8)

        error = (low(got) - low(want)).abs().mean()
        assert error < 0.03
        if op != Dihedral():
            # without mapping the chain back, the read would show another place
            wrong = op.apply(task._read_hi(plain)(2, chain))
            assert (low(wrong) - low(want)).abs().mean() > 2 * error
        # chain_frames: the chain's box in level-0 pixels
        frames = chain_frames(batch.frames[0], np.array([[0.35, -0.4]]), np.array([0.3]))
        f = batch.frames[0]
        w = f[2] - f[0]
        np.testing.assert_allclose(frames[0], [f[0] + w * 0.525, f[1] + w * 0.15,
                                               f[0] + w * 0.825, f[1] + w * 0.45])


def test_validation_forward_matches_magnify(cohort_csv):
    """The batched training-time forward (eval mode) gives magnify's probability."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_magnet import magnify, open_slide
    from napari_magnet.engine.cohort import SlideDataset
    from napari_magnet.engine.batches import SlideBatch as _Batch
    from napari_magnet.models.magnet import MagNetTask as _MagNetTask
    from napari_magnet.engine.types import MagnifyResult

    records = read_cohort(cohort_csv)[:3]
    model = load_model("magnet3-lite", device="cpu").eval()
    task = _MagNetTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        dataset = SlideDataset(records, task.sizes, pool)
        images = [torch.stack([dataset[i]["images"][j] for i in range(3)]) for j in range(2)]
        batch = _Batch(records, pool, None, threads)
        with torch.inference_mode():
            _, _, prob = task.loss(images, torch.zeros(3), batch, None, False)
    for record, p in zip(records, prob.tolist()):
        with open_slide(record.path) as slide:
            result = [x for x in magnify(slide, model, device="cpu")
                      if isinstance(x, MagnifyResult)][0]
        assert p == pytest.approx(result.probability, abs=2e-3)


def test_two_runs_with_worker_processes_in_one_process_do_not_hang(cohort_csv, tmp_path):
    """DataLoader workers come from a fork server and persist across epochs; a second
    train() in the same process (a notebook, a sweep) used to hang in a forked worker."""
    run = tmp_path / "w"
    script = tmp_path / "twice.py"
    script.write_text(
        "from napari_magnet.engine.training import TrainOptions, train\n"
        "if __name__ == '__main__':\n"
        f"    kw = dict(slides={str(cohort_csv)!r}, out={str(run)!r}, batch_size=3, lr=1e-3,\n"
        "              device='cpu', progress=False, val_fraction=0.25, workers=4)\n"
        "    train(TrainOptions(model='ats', epochs=2, **kw))\n"
        f"    train(TrainOptions(resume={str(run)!r}, epochs=3, **kw))\n")
    done = subprocess.run([sys.executable, str(script)], timeout=300, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [int(r["epoch"]) for r in metrics(run)] == [1, 2, 3]


def test_slide_pools_fit_the_memory_budget_and_workers_do_not_copy_it(monkeypatch):
    from napari_magnet.engine.training import (OPEN_SLIDE_OVERHEAD, TRAIN_CACHE_ENV,
                                               slide_pools, train_cache_budget)

    per_slide = SlidePool().cache_bytes + OPEN_SLIDE_OVERHEAD  # the default cache
    monkeypatch.setenv(TRAIN_CACHE_ENV, str(40 * per_slide / 2**20))
    assert train_cache_budget() == 40 * per_slide
    pool, layer1 = slide_pools(400, 16, workers=0)
    assert pool is layer1 and pool.max_open == 40  # what 40 slides' memory holds
    pool, layer1 = slide_pools(25, 16, workers=4)
    assert pool.max_open == 32  # never fewer than two batches need
    assert layer1 is not pool and layer1.max_open == 16  # each worker's own, small
    monkeypatch.setenv(TRAIN_CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=TRAIN_CACHE_ENV):
        train_cache_budget()
    monkeypatch.delenv(TRAIN_CACHE_ENV)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert train_cache_budget() == min(12 * 2**30, ram // 4)
