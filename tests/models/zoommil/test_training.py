"""Training ZoomMIL and its ABMIL baseline from real feature bags (DESIGN §9-10).

One small cohort (8 synthetic slides, 4096² px at 0.5 µm/px), patched at 8, 4 and 1 µm/px
(64 px patches) and embedded with the model's encoder, for the whole module.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_magnet.bags.embedding import embed_bag, embed_bags
from napari_magnet.bags.encoders import RandomFeaturesWarning, build_encoder
from napari_magnet.bags.patching import PatchOptions, bag_path_for, patch_slides
from napari_magnet.cli import main
from napari_magnet.engine.batches import RecordBatch
from napari_magnet.engine.cohort import read_cohort
from napari_magnet.engine.training import CosineSchedule, TrainOptions, load_training_state, train
from napari_magnet.engine.training.data import epoch_rng, seeded_generator
from napari_magnet.models.registry import load_model
from napari_magnet.models.zoommil.config import ZOOMMIL_CONFIGS
from napari_magnet.models.zoommil.training import ZoomMILTask, class_weighted_order
from napari_magnet.synth import generate_cohort

CONFIG = ZOOMMIL_CONFIGS["zoommil"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """``(cohort.csv, bags folder, patches folder)``."""
    root = tmp_path_factory.mktemp("zoommil-cohort")
    generate_cohort(root, 8, 3, 4096, 4096, 0.5, positives=("micro",), jobs=1)
    slides = [r.path for r in read_cohort(root / "cohort.csv")]
    options = PatchOptions(mpps=CONFIG.mpps, patch_size=CONFIG.patch_size)
    patched = patch_slides(slides, root / "patches", options)
    assert {o.status for o in patched} == {"written"}
    encoder = build_encoder(CONFIG.encoder)
    embedded = embed_bags(
        [o.output for o in patched], root / "bags", encoder, slides_dir=root, workers=2
    )
    assert {o.status for o in embedded} == {"written"}, [o.reason for o in embedded]
    return root / "cohort.csv", root / "bags", root / "patches"


def _options(csv_path, out, **kw) -> TrainOptions:
    base = dict(
        slides=csv_path,
        out=out,
        model="zoommil",
        epochs=2,
        val_fraction=0.25,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return TrainOptions(**base)


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _ghost_cohort(csv_path: Path, where: Path) -> Path:
    """The cohort with every slide replaced by an empty file of the same name: a run that
    opened a slide would fail."""
    where.mkdir()
    rows = list(csv.DictReader(open(csv_path, newline="")))
    for row in rows:
        (where / Path(row["path"]).name).write_bytes(b"")
    with open(where / "cohort.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return where / "cohort.csv"


def test_zoommil_trains_from_bags_without_opening_a_slide(cohort, tmp_path):
    csv_path, bags, _ = cohort
    ghosts = _ghost_cohort(csv_path, tmp_path / "ghosts")
    run = tmp_path / "run"
    result = train(_options(ghosts, run, family_options={"bags": str(bags)}))
    assert result.epochs_done == 2
    rows = _rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(float(r["train_loss"])) and np.isfinite(float(r["val_loss"]))
        assert float(r["lr"]) == pytest.approx(1e-4)  # the anchor's, no cosine
        assert int(r["steps"]) == 6 * int(r["epoch"])  # batch 1, 6 training slides
    meta, tensors = load_training_state(run)
    assert meta["task"]["plateau"]["best"] == pytest.approx(min(float(r["val_loss"]) for r in rows))
    # Adam holds the trainable parameters only: the frozen encoder is not optimised ...
    model = load_model(run / "last.safetensors", device="cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("encoder.") for n in trainable)
    n_optimised = len(meta["optimizers"]["adam"]["param_groups"][0]["params"])
    assert n_optimised == len(trainable)
    # ... and comes out as it went in (its weights travel with the checkpoint)
    fresh = load_model("zoommil", device="cpu")
    for name, value in fresh.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[name], value), name


def test_the_cli_trains_zoommil_and_abmil_trains_from_the_same_bags(cohort, tmp_path, capsys):
    csv_path, bags, _ = cohort
    run = tmp_path / "cli"
    args = ["train", "--model", "zoommil", "--bags", str(bags), "--slides", str(csv_path)]
    args += ["--epochs", "1", "--out", str(run), "--device", "cpu", "--quiet"]
    assert main(args) == 0
    assert "1 epoch(s) done" in capsys.readouterr().out
    assert load_model(run / "best.safetensors", device="cpu").model_name == "zoommil"
    abmil = train(
        _options(
            csv_path,
            tmp_path / "abmil",
            model="abmil",
            epochs=1,
            family_options={"bags": str(bags)},
        )
    )
    assert np.isfinite(abmil.history[0]["train_loss"])
    assert load_model(abmil.best_checkpoint, device="cpu").config.mpps == (1.0,)


def test_clear_errors_without_bags_or_with_the_wrong_ones(cohort, tmp_path, capsys):
    csv_path, bags, patches = cohort
    args = ["train", "--model", "zoommil", "--slides", str(csv_path), "--epochs", "1"]
    args += ["--out", str(tmp_path / "none"), "--device", "cpu", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--bags" in err and "napari-magnet patch" in err and "napari-magnet embed" in err

    def error(bag_dir: Path) -> str:
        with pytest.raises(ValueError) as info:
            train(
                _options(
                    csv_path,
                    tmp_path / f"run-{bag_dir.name}",
                    epochs=1,
                    family_options={"bags": str(bag_dir)},
                )
            )
        return str(info.value)

    slides = [r.path for r in read_cohort(csv_path)]
    # one bag missing
    missing = tmp_path / "missing"
    shutil.copytree(bags, missing)
    bag_path_for(slides[0], missing).unlink()
    text = error(missing)
    assert slides[0].name in text and "napari-magnet patch" in text and "embed" in text
    # patched, not embedded
    text = error(patches)
    assert "no features" in text and "napari-magnet embed" in text
    # one bag embedded by another encoder
    other = tmp_path / "other"
    shutil.copytree(bags, other)
    victim = bag_path_for(slides[1], other)
    with pytest.warns(RandomFeaturesWarning):  # no weights for it here: fine for this
        other_encoder = build_encoder("torchvision:mobilenet_v3_small")
    outcome = embed_bag(
        bag_path_for(slides[1], patches),
        other_encoder,
        output=victim,
        slides_dir=csv_path.parent,
        overwrite=True,
    )
    assert outcome.status == "written", outcome.reason
    text = error(other)
    assert str(victim) in text and "mobilenet_v3_small" in text and CONFIG.encoder in text
    # ... and by the same encoder with other weights (a file of its own)
    weights = tmp_path / "other-weights.safetensors"
    own = build_encoder(CONFIG.encoder).module.state_dict()
    own = {k.removeprefix("body."): v for k, v in own.items() if k.startswith("body.")}
    save_file({k: (v + 0.01 if v.is_floating_point() else v) for k, v in own.items()}, weights)
    outcome = embed_bag(
        bag_path_for(slides[1], patches),
        build_encoder(CONFIG.encoder, weights),
        output=victim,
        slides_dir=csv_path.parent,
        overwrite=True,
    )
    assert outcome.status == "written", outcome.reason
    text = error(other)
    assert str(victim) in text and "other weights" in text and "--overwrite" in text
    # other magnifications (8, 2, 1 µm/px)
    wrong = tmp_path / "wrong-mpps"
    patch_slides(slides, wrong, PatchOptions(mpps=(8, 2, 1), patch_size=CONFIG.patch_size))
    text = error(wrong)
    assert "8, 4, 1" in text and "needs" in text


def test_resume_equals_a_straight_run_and_keeps_the_plateau(cohort, tmp_path):
    csv_path, bags, _ = cohort
    fam = {"bags": str(bags)}
    straight = train(_options(csv_path, tmp_path / "straight", epochs=3, family_options=fam))
    part = tmp_path / "part"
    train(_options(csv_path, part, epochs=2, family_options=fam))
    # resumed without --bags: the run's own family options hold
    resumed = train(_options(csv_path, part, model=None, epochs=3, resume=part))
    assert resumed.epochs_done == 3
    for a, b in zip(straight.history, resumed.history):
        for key in ("train_loss", "val_loss", "train_auroc", "val_auroc", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    sa, ta = load_training_state(tmp_path / "straight")
    sb, tb = load_training_state(part)
    assert sa["task"] == sb["task"]
    for name in ta:
        assert torch.allclose(ta[name].float(), tb[name].float(), atol=1e-6), name

    # The plateau rule: at a negligible rate the validation loss never improves, so after
    # the first epoch and 6 worse ones the rate drops to 0.8×; resumed in the middle, the
    # rule goes on counting where it was.
    tiny = dict(lr=1e-12, family_options=fam)
    flat = tmp_path / "flat"
    train(_options(csv_path, flat, epochs=4, **tiny))
    train(_options(csv_path, flat, model=None, epochs=8, resume=flat))
    lrs = [float(r["lr"]) for r in _rows(flat)]
    assert lrs[:7] == pytest.approx([1e-12] * 7, rel=1e-6)
    assert lrs[7] == pytest.approx(0.8e-12, rel=1e-6)
    meta, _ = load_training_state(flat)
    assert meta["optimizers"]["adam"]["param_groups"][0]["lr"] == pytest.approx(0.8e-12, rel=1e-6)


def test_class_weighted_draws_balance_the_classes():
    labels = np.array([0] * 6 + [1] * 2)
    draws = [class_weighted_order(labels, epoch_rng(0, e)) for e in range(400)]
    assert all(len(d) == 8 for d in draws)
    assert draws[0] == class_weighted_order(labels, epoch_rng(0, 0))
    positives = np.mean([labels[d].mean() for d in draws])
    assert positives == pytest.approx(0.5, abs=0.03)  # uniform would give 0.25
    assert class_weighted_order(np.array([], dtype=int), epoch_rng(0, 0)) == []


def test_a_step_descends_the_loss_of_its_batch(cohort):
    """One Adam step on a batch of two slides (a tumour, a negative) lowers that batch's
    loss, recomputed with the same noise and dropout: the gradient reaches the heads and
    points the right way (a detached, zeroed or reversed gradient fails this)."""
    csv_path, bags, _ = cohort
    records = read_cohort(csv_path)
    batch = RecordBatch([next(r for r in records if r.label == k) for k in (1, 0)], None, None)
    labels = torch.tensor([1.0, 0.0])
    model = load_model("zoommil", device="cpu", seed=0)
    options = _options(csv_path, None, lr=1e-4, family_options={"bags": str(bags)})
    task = ZoomMILTask(model, options, torch.device("cpu"))
    model.train()

    def loss():
        torch.manual_seed(1)  # dropout
        return task.loss([], labels, batch, seeded_generator(0, 1, 2), False)

    before, parts, probs = loss()
    assert probs.shape == (2,) and parts["classification"] == pytest.approx(float(before))
    schedule = CosineSchedule(list(task.optimizers.values()), 1, enabled=False)
    task.backward_step(before, torch.amp.GradScaler("cuda", enabled=False), schedule)
    after, _, _ = loss()
    assert float(after) < float(before) - 2e-4, (float(before), float(after))


def test_the_loss_falls_when_the_gradient_flows(cohort, tmp_path):
    """Training lowers the loss of the training slides (evaluated deterministically, in
    eval mode, before and after): a broken gradient or optimizer step would not."""
    csv_path, bags, _ = cohort
    options = _options(
        csv_path,
        tmp_path / "learn",
        epochs=5,
        lr=1e-3,
        val_fraction=0.0,
        family_options={"bags": str(bags)},
    )
    records = read_cohort(csv_path)

    def eval_loss(model) -> float:
        task = ZoomMILTask(model, options, torch.device("cpu"))
        model.eval()

        total = 0.0
        with torch.inference_mode():
            for r in records:
                batch = RecordBatch([r], None, None)
                loss, _, _ = task.loss([], torch.tensor([float(r.label)]), batch, None, False)
                total += float(loss)
        return total / len(records)

    torch.manual_seed(options.seed)
    before = eval_loss(load_model("zoommil", device="cpu", seed=options.seed))
    result = train(options)
    after = eval_loss(load_model(result.last_checkpoint, device="cpu"))
    losses = [row["train_loss"] for row in result.history]
    assert after < 0.7 * before, (before, after, losses)
    assert min(losses[-2:]) < losses[0], losses


def test_encoder_weights_of_the_user_train_and_travel_with_the_checkpoint(cohort, tmp_path):
    """Bags embedded with a weights file of the user's: ``--encoder-weights`` gives the model's
    encoder the same weights, the checkpoint carries them and records the file's hash, and
    the reloaded model recognises those bags as its own."""
    from napari_magnet.bags.embedding import embed_bags
    from napari_magnet.models.registry import load_model

    csv_path, _, patches = cohort
    weights = tmp_path / "mine.safetensors"
    own = build_encoder(CONFIG.encoder).module.state_dict()
    own = {k.removeprefix("body."): v for k, v in own.items() if k.startswith("body.")}
    save_file({k: (v * 1.01 if v.is_floating_point() else v) for k, v in own.items()}, weights)
    encoder = build_encoder(CONFIG.encoder, weights)
    bags = tmp_path / "bags"
    outcomes = embed_bags(sorted(patches.glob("*.h5")), bags, encoder, slides_dir=csv_path.parent)
    assert all(o.status == "written" for o in outcomes)
    fam = {"bags": str(bags)}
    with pytest.raises(ValueError, match="other weights"):
        train(_options(csv_path, tmp_path / "refused", epochs=1, family_options=fam))
    result = train(
        _options(
            csv_path,
            tmp_path / "run",
            epochs=1,
            family_options={**fam, "encoder_weights": str(weights)},
        )
    )
    model = load_model(result.best_checkpoint, device="cpu")
    assert model.config.encoder_weights == encoder.weights_sha256
    assert model.encoder_config["weights_sha256"] == encoder.weights_sha256
    mine = encoder.module.state_dict()
    for name, tensor in model.encoder.state_dict().items():
        assert torch.equal(tensor, mine[name]), name
