"""The training loop: :func:`train` (a run, epoch after epoch) and one pass over a split.

See the package docstring (:mod:`napari_magnet.engine.training`) for the design.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...io.atomic import atomic_write_json
from ..batches import RecordBatch, SlideBatch, amp_dtype
from ..cohort import SlideDataset, SlidePool, SlideRecord, class_counts, read_cohort, split_cohort
from ..evaluation import accuracy, auroc
from .data import _Loader, epoch_rng, seed_global_torch, seeded_generator, slide_pools
from .options import TrainOptions, TrainResult
from .report import finite_metrics, log, plot_learning_curve, warn, write_metrics
from .schedule import CosineSchedule
from .state import load_training_state, restore_state, save_state, state_json_path

__all__ = ["train"]


def _named_models() -> tuple[list[str], list[str]]:
    """``(named, trainable)``: every family's named configurations, and those of families
    that train from slides, in :func:`~napari_magnet.models.registry.listed_models` order."""
    from ...models.family import families
    from ...models.registry import listed_models

    configs = {name: family for family in families() for name in family.configs}
    named = [m for m in listed_models() if m in configs]
    return named, [m for m in named if configs[m].training_task is not None]


def _make_task(model, options: TrainOptions, device: torch.device):
    from ...models.family import family_of

    family = family_of(model)
    if family.training_task is None:
        raise ValueError(
            f"models of the {family.architecture!r} family cannot be trained from slides"
        )
    return family.training_task(model, options, device)


def _check_options(options: TrainOptions) -> None:
    if int(options.epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {options.epochs}")
    if options.batch_size is not None and int(options.batch_size) < 1:
        raise ValueError(f"batch size must be at least 1, got {options.batch_size}")
    if options.lr is not None and not float(options.lr) > 0:
        raise ValueError(f"learning rate must be positive, got {options.lr}")
    if options.rule not in ("enough", "paper"):
        raise ValueError(f"rule must be 'enough' or 'paper', got {options.rule!r}")


def _start_model(options: TrainOptions):
    """``(model on the CPU, options with the model's name, state meta, state tensors)``:
    the resumed run's model, a warm start from a checkpoint, or a new model."""
    from ...models.checkpoints import (
        CheckpointError,
        load_checkpoint,
        load_state_into,
        read_checkpoint,
    )
    from ...models.registry import build_architecture, load_model

    state_meta: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    warm_start = None
    if options.resume is not None:
        rp = Path(options.resume)
        if state_json_path(rp) is not None:
            state_meta, tensors = load_training_state(rp)
        else:
            warm_start = read_checkpoint(rp)  # CheckpointError when neither
    warm_note = (
        "warm start from the weights of {} (a model checkpoint, not a training "
        "state: a new run, epochs start at 1)"
    )
    if state_meta is not None:
        arch = state_meta["model"]["architecture"]
        name = state_meta["model"]["name"]
        if options.model and options.model != name:
            raise ValueError(
                f"--model {options.model} differs from the resumed run's model "
                f"{name!r}; omit --model when resuming"
            )
        try:
            model = build_architecture(arch, state_meta["model"]["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{options.resume}: cannot rebuild the model ({exc})") from None
        model.model_name = name
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state, strict=True)
        # The family's options of the resumed run hold unless given again (e.g. the folder
        # a bag-trained model reads its features from).
        saved = (state_meta.get("options") or {}).get("family_options") or {}
        family_options = {**saved, **dict(options.family_options)}
        return (
            model,
            dataclasses.replace(options, model=name, family_options=family_options),
            state_meta,
            tensors,
        )
    if warm_start is not None and not options.model:
        model = load_checkpoint(warm_start.weights_path)
        warn(warm_note.format(warm_start.weights_path))
        return model, dataclasses.replace(options, model=warm_start.model_name), None, None
    named, trainable = _named_models()
    if not options.model:
        raise ValueError(f"choose a model (--model {', '.join(trainable)})")
    if options.model not in named:
        raise ValueError(
            f"unknown model {options.model!r}; trainable models: {', '.join(trainable)}"
        )
    model = load_model(options.model, device="cpu", seed=options.seed)
    if warm_start is not None:
        load_state_into(model, warm_start)
        warn(warm_note.format(warm_start.weights_path))
    return model, options, None, None


def _run_epoch(
    task,
    loaders: _Loader,
    records: list[SlideRecord],
    order: Sequence[int],
    batch_size: int,
    options: TrainOptions,
    pool: SlidePool,
    reader_pool: ThreadPoolExecutor,
    *,
    train: bool,
    epoch: int,
    amp: bool,
    scaler=None,
    schedule: CosineSchedule | None = None,
    desc: str = "",
):
    """One pass over ``records`` in ``order``: ``(mean loss, mean loss parts, probabilities,
    labels)``; with ``train``, one optimizer step per batch."""
    from ...models.augment import Dihedral

    model = task.model
    model.train(train)
    reads_slides = bool(getattr(task, "reads_slides", True))
    # The global RNG drives the linearized sampler's jitter: seeded per epoch, a resumed run
    # draws what an uninterrupted one would have.
    seed_global_torch(options.seed, epoch, 4 if train else 5)
    aug_gen = seeded_generator(options.seed, epoch, 1)
    sample_gen = seeded_generator(options.seed, epoch, 2 if train else 3, device=task.device)
    losses, weights = [], []
    parts_sum: dict[str, float] = {}
    probs = np.zeros(len(order))
    labels = np.zeros(len(order), dtype=int)
    seen = 0
    loader = loaders.epoch(order)
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(order), desc=desc, unit="slide", leave=False, file=sys.stderr, disable=None
        )  # no bar when stderr is not a terminal (logs stay readable)
    try:
        for data in loader:
            idx = data["index"].tolist()
            recs = [records[i] for i in idx]
            ops = [Dihedral.random(aug_gen) for _ in recs] if train and options.augment else None
            batch = (
                SlideBatch(recs, pool, ops, reader_pool)
                if reads_slides
                else RecordBatch(recs, ops, reader_pool)
            )
            label = data["label"].float()
            if train:
                loss, parts, prob = task.loss(
                    data["images"], label.to(task.device), batch, sample_gen, amp
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {float(loss)} at epoch {epoch}; lower the learning rate"
                    )
                task.backward_step(loss, scaler, schedule)
            else:
                with torch.inference_mode():
                    loss, parts, prob = task.loss(
                        data["images"], label.to(task.device), batch, sample_gen, amp
                    )
            n = len(recs)
            losses.append(float(loss.detach()) * n)
            weights.append(n)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * n
            probs[seen : seen + n] = prob.numpy()
            labels[seen : seen + n] = label.numpy().astype(int)
            seen += n
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{sum(losses) / sum(weights):.4f}")
    finally:
        if bar is not None:
            bar.close()
    total = sum(weights) or 1
    return (
        sum(losses) / total,
        {k: v / total for k, v in parts_sum.items()},
        probs[:seen],
        labels[:seen],
    )


def _epoch_order(task, labels: np.ndarray, rng: np.random.Generator) -> list[int]:
    """The training slides' order of one epoch: the task's ``epoch_order(labels, rng)``
    when it has one (e.g. class-weighted draws), else a uniform permutation."""
    epoch_order = getattr(task, "epoch_order", None)
    if epoch_order is None:
        return rng.permutation(len(labels)).tolist()
    order = [int(i) for i in epoch_order(labels, rng)]
    if not order or min(order) < 0 or max(order) >= len(labels):
        raise ValueError(
            f"the task's epoch_order gave {len(order)} indices, some outside 0..{len(labels) - 1}"
        )
    return order


def _is_better(candidate: dict[str, float], best: dict[str, Any] | None) -> bool:
    """Validation AUROC, then accuracy, then lower validation (else training) loss."""
    if not best:
        return True

    def key(m: dict) -> tuple:
        def f(v, default):
            return default if v is None or (isinstance(v, float) and math.isnan(v)) else v

        return (
            f(m.get("val_auroc"), -1.0),
            f(m.get("val_accuracy"), -1.0),
            -f(m.get("val_loss"), f(m.get("train_loss"), math.inf)),
        )

    return key(candidate) > key(best)


def train(options: TrainOptions) -> TrainResult:
    """Train a model on a cohort; see :mod:`napari_magnet.engine.training`.

    Parameters
    ----------
    options : TrainOptions
        What to train, on what, for how long, where to (left unmodified).

    Returns
    -------
    TrainResult
        The run's outputs, best epoch and history.

    Raises
    ------
    CohortError
        The CSV, or the split, cannot be used (raised before any training).
    CheckpointError
        ``resume`` names a corrupt or mismatched state.
    ValueError
        Bad options (no or unknown model, epochs < 1, device …).
    KeyboardInterrupt
        Propagated after a message; the run resumes from its last completed epoch.
    """
    from ...models.checkpoints import save_checkpoint
    from ...models.registry import resolve_device

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    _check_options(options)
    out = Path(options.out)

    # 1. The cohort, validated before anything else.
    records = read_cohort(options.slides, exclude_classes=options.exclude_classes)
    train_records, val_records = split_cohort(
        records, options.val_fraction, options.seed, where=str(options.slides)
    )

    # 2. Resume point (state or weights), model and device.
    device = resolve_device(options.device)
    model, options, state_meta, tensors = _start_model(options)
    model = model.to(device)
    task = _make_task(model, options, device)
    batch_size = int(options.batch_size or task.default_batch_size())
    steps_per_epoch = max(math.ceil(len(train_records) / batch_size), 1)
    schedule = CosineSchedule(
        list(task.optimizers.values()),
        options.epochs * steps_per_epoch,
        enabled=task.schedule_enabled,
    )
    amp = device.type == "cuda"
    # bf16 has fp32's range (no overflow, no loss scaling); fp16 + GradScaler where it's absent.
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype(device) == torch.float16)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    first_epoch = 1
    split = {
        "train": [str(r.path) for r in train_records],
        "val": [str(r.path) for r in val_records],
    }
    if state_meta is not None:
        history, best, first_epoch = restore_state(
            state_meta,
            tensors,
            task,
            schedule,
            scaler,
            options.epochs * steps_per_epoch,
            where=options.resume,
        )
        if state_meta.get("split") and set(state_meta["split"].get("val", [])) != set(split["val"]):
            warn(
                "the validation split differs from the resumed run's (different CSV, seed "
                "or --val-fraction)"
            )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / "split.json",
        {
            "train": split["train"],
            "val": split["val"],
            "train_classes": class_counts(train_records),
            "val_classes": class_counts(val_records),
        },
    )

    if first_epoch > options.epochs:
        log(
            options,
            f"the run already has {first_epoch - 1} epoch(s) (asked for "
            f"{options.epochs}); nothing to do",
        )
        return TrainResult(
            out=out,
            epochs_done=first_epoch - 1,
            best_epoch=int(best.get("epoch", 0)),
            best_metric=best,
            history=history,
            best_checkpoint=out / "best.safetensors"
            if (out / "best.safetensors").is_file()
            else None,
        )
    log(
        options,
        f"training {options.model} on {len(train_records)} slides "
        f"({class_counts(train_records)}), validating on {len(val_records)}; "
        f"batch {batch_size}, lr {schedule.lr():.3g}, device {device}"
        f"{', mixed precision' if amp else ''}; epochs {first_epoch}..{options.epochs}",
    )

    pool, layer1_pool = slide_pools(
        len(train_records) + len(val_records), batch_size, options.workers, options.rule
    )
    train_set = SlideDataset(train_records, task.sizes, layer1_pool)
    val_set = SlideDataset(val_records, task.sizes, layer1_pool)
    # One thread per slide of the batch, up to half the cores (each slide's reader decodes
    # its chunks on two threads of its own).
    reader_pool = ThreadPoolExecutor(
        max(2, min(batch_size, (os.cpu_count() or 2) // 2)),
        thread_name_prefix="napari-magnet-train",
    )
    train_loader = _Loader(train_set, batch_size, options.workers)
    val_loader = _Loader(val_set, batch_size, options.workers)
    slide_labels = np.array([r.label for r in train_records], dtype=np.int64)
    epoch = first_epoch - 1
    try:
        for epoch in range(first_epoch, options.epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            order = _epoch_order(task, slide_labels, epoch_rng(options.seed, epoch))
            train_loss, parts, train_probs, train_labels = _run_epoch(
                task,
                train_loader,
                train_records,
                order,
                batch_size,
                options,
                pool,
                reader_pool,
                train=True,
                epoch=epoch,
                amp=amp,
                scaler=scaler,
                schedule=schedule,
                desc=f"epoch {epoch}/{options.epochs}",
            )
            row: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_auroc": auroc(train_labels, train_probs),
                "lr": schedule.lr(),
                "steps": schedule.step_count,
            }
            row.update({f"train_{k}": v for k, v in parts.items()})
            if val_records:
                val_loss, _, val_probs, val_labels = _run_epoch(
                    task,
                    val_loader,
                    val_records,
                    list(range(len(val_records))),
                    batch_size,
                    options,
                    pool,
                    reader_pool,
                    train=False,
                    epoch=epoch,
                    amp=amp,
                    desc="validation",
                )
                if not np.all(np.isfinite(val_probs)):
                    raise RuntimeError(
                        f"epoch {epoch}: the model gave non-finite validation probabilities "
                        f"({int((~np.isfinite(np.asarray(val_probs))).sum())} of "
                        f"{len(val_probs)} slides); its weights diverged. Resume from the "
                        f"last good state in {out} with a lower --lr, or train on the CPU"
                    )
                row.update(
                    val_loss=val_loss,
                    val_auroc=auroc(val_labels, val_probs),
                    val_accuracy=accuracy(val_labels, val_probs),
                )
            else:
                row.update(val_loss=float("nan"), val_auroc=float("nan"), val_accuracy=float("nan"))
            row["seconds"] = time.perf_counter() - t0
            row["cpu_seconds"] = time.process_time() - c0
            history.append(row)
            end_epoch = getattr(task, "end_epoch", None)
            if end_epoch is not None:  # before the state is saved: it holds what this changes
                end_epoch(dict(row))
            metric = {k: row[k] for k in ("val_auroc", "val_accuracy", "val_loss", "train_loss")}
            provenance = {
                "training": {
                    "epoch": epoch,
                    "cohort": str(options.slides),
                    "train_slides": len(train_records),
                    "val_slides": len(val_records),
                    "metrics": finite_metrics(metric),
                }
            }
            save_checkpoint(
                model, out / "last", notes=f"napari-magnet train, epoch {epoch}", extra=provenance
            )
            if _is_better(metric, best):
                best = {"epoch": epoch, **finite_metrics(metric)}
                save_checkpoint(
                    model,
                    out / "best",
                    notes=f"napari-magnet train, best epoch {epoch}",
                    extra=provenance,
                )
            # The commit point of the epoch: train_state.json, replaced atomically.
            save_state(out, model, task, schedule, scaler, epoch, best, history, options, split)
            write_metrics(out / "metrics.csv", history)
            plot_learning_curve(
                history, out / "learning_curve.png", title=f"{options.model}: {out.name}"
            )
            log(
                options,
                f"epoch {epoch}/{options.epochs}: train loss {train_loss:.4f}, "
                f"val loss {row['val_loss']:.4f}, val AUROC {row['val_auroc']:.3f}, "
                f"val accuracy {row['val_accuracy']:.3f} ({row['seconds']:.0f} s, "
                f"{row['cpu_seconds']:.0f} CPU s)",
            )
    except KeyboardInterrupt:
        log(
            options,
            f"\ninterrupted during epoch {epoch}; epochs up to {epoch - 1} are "
            f"saved: resume with --resume {out}",
        )
        raise
    finally:
        reader_pool.shutdown(wait=True)
        pool.close()
    # make sure the outputs exist even when resuming into a finished run
    write_metrics(out / "metrics.csv", history)
    plot_learning_curve(history, out / "learning_curve.png", title=f"{options.model}: {out.name}")
    return TrainResult(
        out=out,
        epochs_done=epoch,
        best_epoch=int(best.get("epoch", 0)),
        best_metric=best,
        history=history,
        best_checkpoint=out / "best.safetensors",
        last_checkpoint=out / "last.safetensors",
        metrics_csv=out / "metrics.csv",
        curve_png=out / "learning_curve.png",
        wall_seconds=time.perf_counter() - start_wall,
        cpu_seconds=time.process_time() - start_cpu,
    )
