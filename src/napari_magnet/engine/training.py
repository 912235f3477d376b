"""Training MagNet and attention-sampling models on slide cohorts (DESIGN §4 Training, §5).

``napari-magnet train`` calls :func:`train`. What it does:

* **Cohort.** The CSV is read and validated first (:func:`~.cohort.read_cohort`): any
  problem is a :class:`~.cohort.CohortError` before a slide is opened or a model built. A
  stratified split (by lesion class, seeded) gives training and validation slides.
* **Data.** A ``DataLoader`` over slides; the Dataset renders layer 1's inputs (the slide
  letterboxed into a square, as ``magnify`` does) with the threaded
  :class:`~.regions.RegionReader` of each slide. The deeper reads happen inside the
  forward: MagNet calls ``read_hi(layer, θ chain)`` and the attention-sampling model
  ``read_patches(centres)``, answered here from the same readers, every slide of the batch
  read in parallel.
* **Augmentation** (flips and 90° rotations, one random element of the dihedral group per
  slide and epoch). Layer 1's images are transformed after reading; a θ chain computed in
  the augmented frame is mapped back with :meth:`Dihedral.to_original` to find the level-0
  region, which is read unrotated and then transformed with the same op — so every read
  shows exactly what the augmented slide shows there. Attention-sampling centres are mapped
  back the same way and each patch transformed.
* **Optimisation.** MagNet: Adam (lr 3e-5 as in the paper, ``lr`` overrides it: 3e-5 is
  slow for short CPU runs), cosine annealing per step over the whole run, batch 16
  (3 layers) or 8 (4 layers). Attention sampling: two Adams (lr 1e-3; the attention one
  with betas (0.999, 0.999)), the expectation estimator by default, REINFORCE (running
  baseline, entropy regularisation) with ``ats_learning="reinforce"``. Mixed precision
  (``torch.autocast`` bf16, or fp16 + ``GradScaler`` on GPUs without bf16) only on CUDA.
* **Every epoch:** validation AUROC and accuracy, ``metrics.csv`` and
  ``learning_curve.png`` rewritten from the history, the model after the epoch as
  ``last.safetensors`` + ``.json``, the best one (validation AUROC, then accuracy, then lower
  validation loss) as ``best.*`` (both :mod:`~napari_magnet.models.checkpoints` pairs,
  loadable with ``load_model``), and the **training state** — model, optimizers, schedule,
  scaler, epoch, best metric, history — as ``train_state/epoch-NNNN.safetensors`` (tensors,
  optimizer state under flattened keys) + ``train_state.json`` (everything else, with the
  tensors' sha256). Nothing is pickled. ``train_state.json`` is replaced atomically after
  its tensors are on disk, so an interruption at any moment leaves the last completed epoch
  resumable with ``resume=<out dir>``.

Determinism: the initial weights come from ``seed``; the shuffling, the augmentation ops and
the patch sampling of epoch ``e`` from ``(seed, e)`` — so a resumed run draws what an
uninterrupted one would have.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cohort import (SlideDataset, SlidePool, SlideRecord, class_counts, read_cohort,
                     split_cohort)
from .evaluation import accuracy, auroc
from .batches import SlideBatch, amp_dtype

__all__ = [
    "STATE_FORMAT",
    "TrainOptions",
    "TrainResult",
    "CosineSchedule",
    "export_model",
    "load_training_state",
    "plot_learning_curve",
    "slide_pools",
    "train",
    "train_cache_budget",
]

STATE_FORMAT = "napari-magnet-training-state/1"
STATE_JSON = "train_state.json"
STATE_DIR = "train_state"
#: Environment variable: MB of memory a training run may spend keeping its slides open across
#: epochs (default: a quarter of the machine's memory, at most 12 GiB).
TRAIN_CACHE_ENV = "NAPARI_MAGNET_TRAIN_CACHE_MB"
#: Memory an open slide holds besides its decoded-chunk cache: its reader's two threads (and
#: their malloc arenas), the file's decoder and OpenSlide state. Measured on the synthetic
#: 8192² slides: about 25 MB.
OPEN_SLIDE_OVERHEAD = 32 * 2**20


# ----------------------------------------------------------------------------- options


@dataclass
class TrainOptions:
    """What :func:`train` does (the CLI's ``train`` arguments).

    Attributes
    ----------
    slides : path
        Cohort CSV.
    out : path
        Run folder (created).
    model : str or None
        Registered name (``magnet3``, ``magnet4``, ``magnet3-lite``, ``ats``, ``ats-p50-n5`` …);
        taken from the state when resuming.
    epochs : int
        Total epochs of the run (a resumed run continues up to this number).
    batch_size : int or None
        Slides per step; default 16 for MagNet with 3 layers, 8 with 4 or more, 8 for ats.
    lr : float or None
        Learning rate; default 3e-5 (MagNet, the paper's) or 1e-3 (attention sampling).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …
    resume : path or None
        A run folder or its ``train_state.json`` (full resume), or a model checkpoint
        (weights only: a warm start at epoch 0).
    val_fraction : float
        Fraction of each lesion class held out for validation (0 disables validation).
    seed : int
        Initial weights, split, shuffling, augmentation and sampling.
    ats_learning : {"expectation", "reinforce"}
        How an attention-sampling model learns its attention.
    entropy_weight : float
        λ of REINFORCE's entropy regulariser.
    augment : bool
        Random flips and 90° rotations.
    exclude_classes : tuple of str
        Lesion classes left out of the run (the paper excludes ``itc``).
    workers : int
        DataLoader worker processes (0: layer-1 reads in the main process; region reads are
        threaded either way). They start from a fork server and live for the whole run; a
        script that calls :func:`train` with workers needs the usual
        ``if __name__ == "__main__":`` guard.
    rule : {"enough", "paper"}
        Pyramid level rule for every read.
    progress : bool
        tqdm progress bars and one line per epoch on stderr.
    """

    slides: str | os.PathLike
    out: str | os.PathLike
    model: str | None = None
    epochs: int = 10
    batch_size: int | None = None
    lr: float | None = None
    device: str = "auto"
    resume: str | os.PathLike | None = None
    val_fraction: float = 0.2
    seed: int = 0
    ats_learning: str = "expectation"
    entropy_weight: float = 0.01
    augment: bool = True
    exclude_classes: tuple[str, ...] = ()
    workers: int = 0
    rule: str = "enough"
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        d = asdict(self)
        for k in ("slides", "out", "resume"):
            if d[k] is not None:
                d[k] = str(d[k])
        d["exclude_classes"] = list(self.exclude_classes)
        return d


@dataclass
class TrainResult:
    """What a run left behind."""

    out: Path
    epochs_done: int
    best_epoch: int
    best_metric: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    metrics_csv: Path | None = None
    curve_png: Path | None = None
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0


# ----------------------------------------------------------------------------- schedule


class CosineSchedule:
    """Cosine annealing per optimizer step: ``lr_t = base · (1 + cos(π t / T)) / 2``.

    Applied to every param group of the given optimizers; ``total_steps`` can change on
    resume (a run extended to more epochs continues along the longer curve).
    ``enabled=False`` keeps the learning rates constant (attention sampling).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], total_steps: int,
                 enabled: bool = True) -> None:
        self.optimizers = list(optimizers)
        self.base_lrs = [[float(g["lr"]) for g in o.param_groups] for o in self.optimizers]
        self.total_steps = max(int(total_steps), 1)
        self.step_count = 0
        self.enabled = bool(enabled)
        self._apply()

    def factor(self) -> float:
        """Current multiplier of the base learning rates."""
        if not self.enabled:
            return 1.0
        t = min(self.step_count, self.total_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t / self.total_steps))

    def _apply(self) -> None:
        f = self.factor()
        for opt, bases in zip(self.optimizers, self.base_lrs):
            for g, base in zip(opt.param_groups, bases):
                g["lr"] = base * f

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def lr(self) -> float:
        """Learning rate of the first param group."""
        return float(self.optimizers[0].param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"base_lrs": self.base_lrs, "total_steps": self.total_steps,
                "step_count": self.step_count, "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.base_lrs = [[float(v) for v in group] for group in state["base_lrs"]]
        self.step_count = int(state["step_count"])
        self.enabled = bool(state.get("enabled", True))
        self._apply()


# ----------------------------------------------------------------------------- tasks


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


def _torch_generator(seed: int, *keys: int, device: torch.device | str = "cpu"
                     ) -> torch.Generator:
    value = int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(value)


def _make_task(model, options: TrainOptions, device: torch.device):
    from ..models.family import family_of

    family = family_of(model)
    if family.training_task is None:
        raise ValueError(f"models of the {family.architecture!r} family cannot be trained "
                         f"from slides")
    return family.training_task(model, options, device)


# ----------------------------------------------------------------------------- state I/O


def _optimizer_tensors(name: str, opt: torch.optim.Optimizer,
                       tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    sd = opt.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    keys: dict[str, list[str]] = {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{pid}.{key}"] = value.detach().to("cpu").contiguous()
                keys.setdefault(str(pid), []).append(key)
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return {"param_groups": sd["param_groups"], "tensor_keys": keys, "scalars": scalars}


def _optimizer_from(name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for pid, keys in meta["tensor_keys"].items():
        state.setdefault(int(pid), {}).update(
            {k: tensors[f"optim.{name}.{pid}.{k}"] for k in keys})
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _save_state(out: Path, model, task, schedule: CosineSchedule, scaler, epoch: int,
                best: dict[str, Any], history: list[dict], options: TrainOptions,
                split: dict[str, list[str]]) -> Path:
    from safetensors.torch import save_file

    from ..models.checkpoints import config_hash_of, sha256_of

    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().to("cpu").contiguous()
               for k, v in model.state_dict().items()}
    optimizers = {name: _optimizer_tensors(name, opt, tensors)
                  for name, opt in task.optimizers.items()}
    name = f"epoch-{epoch:04d}.safetensors"
    target = state_dir / name
    tmp = target.with_name(name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT, "epoch": str(epoch)})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    config = model.config.to_dict()
    meta = {
        "format": STATE_FORMAT,
        "epoch": int(epoch),
        "model": {"architecture": model.architecture, "name": getattr(model, "model_name", ""),
                  "config": config, "config_hash": config_hash_of(config)},
        "best": best,
        "history": history,
        "schedule": schedule.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "optimizers": optimizers,
        "task": task.extra_state(),
        "options": options.to_json(),
        "split": split,
        "tensors_file": f"{STATE_DIR}/{name}",
        "tensors_sha256": sha256_of(target),
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write_text(out / STATE_JSON, json.dumps(meta, indent=1) + "\n")
    for old in state_dir.glob("epoch-*.safetensors*"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out / STATE_JSON


def _state_json_path(path: Path) -> Path | None:
    if path.is_dir():
        return path / STATE_JSON if (path / STATE_JSON).is_file() else None
    if path.name == STATE_JSON and path.is_file():
        return path
    return None


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a training state (``train_state.json`` or its run folder): ``(meta, tensors)``.

    Raises
    ------
    CheckpointError
        Missing or corrupt files, a tensors file that does not match its sha256, a pickle.
    """
    from safetensors.torch import load_file

    from ..models.checkpoints import CheckpointError, sha256_of

    p = Path(path)
    state_json = _state_json_path(p)
    if state_json is None:
        raise CheckpointError(f"{p}: no training state here (expected a run folder holding "
                              f"{STATE_JSON}, or that file)")
    try:
        meta = json.loads(state_json.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_json}: corrupt training state ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_json}: not a napari-magnet training state")
    tensors_path = state_json.parent / meta["tensors_file"]
    if not tensors_path.is_file():
        raise CheckpointError(f"{tensors_path}: tensors of the training state missing")
    with open(tensors_path, "rb") as fh:
        head = fh.read(16)
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80"):
        raise CheckpointError(f"{tensors_path}: a pickle; refused without opening it")
    if sha256_of(tensors_path) != meta["tensors_sha256"]:
        raise CheckpointError(f"{tensors_path}: sha256 differs from {state_json.name} "
                              f"(modified or from another run)")
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors
        raise CheckpointError(f"{tensors_path}: corrupt safetensors file ({exc})") from None
    return meta, tensors


# ----------------------------------------------------------------------------- outputs

_BASE_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auroc", "val_accuracy",
                 "train_auroc", "lr", "seconds", "cpu_seconds", "steps"]


def _write_metrics(path: Path, history: list[dict]) -> None:
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
    _atomic_write_text(path, "\n".join(lines) + "\n")


def plot_learning_curve(history: Sequence[dict], path: str | os.PathLike,
                        title: str = "") -> Path:
    """Draw losses (left) and validation AUROC / accuracy (right) per epoch into a PNG.

    Pure PIL (no plotting library needed).
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
            return (x0 + (e - e_lo) / (e_hi - e_lo) * (x1 - x0),
                    y1 - (v - lo) / (hi - lo) * (y1 - y0))

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
            pts = [px(e, v) for e, v in zip(epochs, values)
                   if isinstance(v, (int, float)) and math.isfinite(v)]
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
    panel(70, 40, 450, 340, [("train loss", train_loss, (31, 119, 180)),
                             ("val loss", val_loss, (255, 127, 14))],
          (max(lo - pad, 0.0), hi + pad), "loss")
    panel(560, 40, 940, 340,
          [("val AUROC", [r.get("val_auroc", float("nan")) for r in history], (44, 160, 44)),
           ("val accuracy", [r.get("val_accuracy", float("nan")) for r in history],
            (214, 39, 40)),
           ("train AUROC", [r.get("train_auroc", float("nan")) for r in history],
            (148, 103, 189))],
          (0.0, 1.0), "AUROC / accuracy")
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def export_model(src: str | os.PathLike, dst: str | os.PathLike, *, notes: str = "",
                 extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Copy a model checkpoint to ``dst`` (``.safetensors`` + ``.json``), re-recording its
    provenance with ``notes`` and ``extra`` (e.g. to ship a trained run as the demo model).

    When ``src`` lies in a training run folder, the run's budget goes into the provenance
    too: ``training_run`` with the epochs, the summed wall and CPU seconds and the options.
    """
    from ..models.checkpoints import load_checkpoint, read_checkpoint, save_checkpoint

    ck = read_checkpoint(src)
    model = load_checkpoint(src)
    provenance = dict(ck.meta.get("provenance", {}))
    for key in ("package", "package_version", "created", "torch_version", "python_version",
                "notes"):
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
            "options": {k: v for k, v in meta.get("options", {}).items()
                        if k not in ("progress", "out", "resume")},
            "train_slides": len(meta.get("split", {}).get("train", [])),
            "val_slides": len(meta.get("split", {}).get("val", [])),
        }
    provenance.update(extra or {})
    return save_checkpoint(model, dst, notes=notes, extra=provenance,
                           model_name=ck.model_name)


# ----------------------------------------------------------------------------- the loop


def train_cache_budget() -> int:
    """Bytes a training run may spend keeping slides open: ``$NAPARI_MAGNET_TRAIN_CACHE_MB``,
    else a quarter of the machine's memory, at most 12 GiB."""
    env = os.environ.get(TRAIN_CACHE_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"{TRAIN_CACHE_ENV} must be a number of MB, got {env!r}") from None
        if not mb >= 0:
            raise ValueError(f"{TRAIN_CACHE_ENV} must be a number of MB >= 0, got {env!r}")
        return int(mb * 2**20)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        ram = 16 * 2**30
    return int(min(12 * 2**30, ram // 4))


def slide_pools(n_slides: int, batch_size: int, workers: int,
                rule: str = "enough") -> tuple[SlidePool, SlidePool]:
    """The run's slide pools: ``(region_pool, layer1_pool)``.

    The region pool (the main process's magnifying reads) keeps as many of the run's slides
    open, chunks cached, as :func:`train_cache_budget` holds at the cache's limit plus
    :data:`OPEN_SLIDE_OVERHEAD` each, and never fewer than a batch needs: re-decoding every
    slide every epoch starved the GPU. Layer 1's reads come from the DataLoader; with worker
    processes each worker opens its own slides, so they get a small pool of their own
    (layer 1 reads the coarsest levels, cheap to reopen) instead of a copy of the big one,
    whose memory would count once per worker.
    """
    per_slide = SlidePool.DEFAULT_CACHE_BYTES + OPEN_SLIDE_OVERHEAD
    keep_open = min(n_slides, train_cache_budget() // per_slide)
    pool = SlidePool(max_open=max(2 * batch_size, 16, keep_open), rule=rule)
    if workers <= 0:
        return pool, pool
    return pool, SlidePool(max_open=max(batch_size, 8), rule=rule)


def _log(options: TrainOptions, text: str) -> None:
    if options.progress:
        print(text, file=sys.stderr, flush=True)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def _collate(items: list[dict]) -> dict:
    return {
        "images": [torch.stack([it["images"][k] for it in items])
                   for k in range(len(items[0]["images"]))],
        "label": torch.stack([it["label"] for it in items]),
        "index": torch.stack([it["index"] for it in items]),
    }


class _EpochOrder(torch.utils.data.Sampler):
    """The slide order of the current epoch (set before each pass)."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class _Loader:
    """One DataLoader per dataset for the whole run, so worker processes (and the slides they
    have open) persist across epochs; :meth:`epoch` sets the order of the next pass."""

    def __init__(self, dataset: SlideDataset, batch_size: int, workers: int) -> None:
        from torch.utils.data import DataLoader

        self.sampler = _EpochOrder()
        # Workers come from a fork server, not a fork of this process: a fork taken while the
        # region-reading threads and torch's thread pools exist can inherit a held lock and
        # hang (seen on a second train() in one process).
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 num_workers=workers, collate_fn=_collate,
                                 persistent_workers=workers > 0,
                                 pin_memory=torch.cuda.is_available(),
                                 multiprocessing_context="forkserver" if workers > 0 else None)

    def epoch(self, order: Sequence[int]):
        self.sampler.order = [int(i) for i in order]
        return self.loader


def _run_epoch(task, loaders: _Loader, records: list[SlideRecord], order: Sequence[int],
               batch_size: int, options: TrainOptions, pool: SlidePool,
               reader_pool: ThreadPoolExecutor, *, train: bool, epoch: int, amp: bool,
               scaler=None, schedule: CosineSchedule | None = None, desc: str = ""):
    from ..models.augment import Dihedral

    model = task.model
    model.train(train)
    # The global RNG drives the linearized sampler's jitter: seeded per epoch, a resumed run
    # draws what an uninterrupted one would have.
    torch.manual_seed(int(np.random.SeedSequence([options.seed, epoch, 4 if train else 5])
                          .generate_state(1)[0]))
    aug_gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([options.seed, epoch, 1]).generate_state(1)[0]))
    sample_gen = _torch_generator(options.seed, epoch, 2 if train else 3, device=task.device)
    losses, weights = [], []
    parts_sum: dict[str, float] = {}
    probs = np.zeros(len(order))
    labels = np.zeros(len(order), dtype=int)
    seen = 0
    loader = loaders.epoch(order)
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc=desc, unit="slide", leave=False, file=sys.stderr,
                   disable=None)  # no bar when stderr is not a terminal (logs stay readable)
    try:
        for data in loader:
            idx = data["index"].tolist()
            recs = [records[i] for i in idx]
            ops = ([Dihedral.random(aug_gen) for _ in recs]
                   if train and options.augment else None)
            batch = SlideBatch(recs, pool, ops, reader_pool)
            label = data["label"].float()
            if train:
                loss, parts, prob = task.loss(data["images"], label.to(task.device), batch,
                                              sample_gen, amp)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {float(loss)} at epoch {epoch}; "
                                             f"lower the learning rate")
                task.backward_step(loss, scaler, schedule)
            else:
                with torch.inference_mode():
                    loss, parts, prob = task.loss(data["images"], label.to(task.device), batch,
                                                  sample_gen, amp)
            n = len(recs)
            losses.append(float(loss.detach()) * n)
            weights.append(n)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * n
            probs[seen:seen + n] = prob.numpy()
            labels[seen:seen + n] = label.numpy().astype(int)
            seen += n
            if bar is not None:
                bar.update(n)
                bar.set_postfix(loss=f"{sum(losses) / sum(weights):.4f}")
    finally:
        if bar is not None:
            bar.close()
    total = sum(weights) or 1
    return (sum(losses) / total, {k: v / total for k, v in parts_sum.items()},
            probs[:seen], labels[:seen])


def _is_better(candidate: dict[str, float], best: dict[str, Any] | None) -> bool:
    if not best:
        return True

    def key(m: dict) -> tuple:
        def f(v, default):
            return default if v is None or (isinstance(v, float) and math.isnan(v)) else v
        return (f(m.get("val_auroc"), -1.0), f(m.get("val_accuracy"), -1.0),
                -f(m.get("val_loss"), f(m.get("train_loss"), math.inf)))

    return key(candidate) > key(best)


def train(options: TrainOptions) -> TrainResult:
    """Train a model on a cohort; see the module docstring.

    Raises
    ------
    CohortError
        The CSV, or the split, cannot be used (raised before any training).
    CheckpointError
        ``resume`` names a corrupt or mismatched state.
    ValueError
        Bad options (unknown model, epochs < 1, device …).
    KeyboardInterrupt
        Propagated after a message; the run resumes from its last completed epoch.
    """
    from ..models.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
    from ..models.registry import build_architecture, known_models, load_model, resolve_device

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if int(options.epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {options.epochs}")
    if options.batch_size is not None and int(options.batch_size) < 1:
        raise ValueError(f"batch size must be at least 1, got {options.batch_size}")
    if options.lr is not None and not float(options.lr) > 0:
        raise ValueError(f"learning rate must be positive, got {options.lr}")
    if options.rule not in ("enough", "paper"):
        raise ValueError(f"rule must be 'enough' or 'paper', got {options.rule!r}")
    out = Path(options.out)

    # 1. The cohort, validated before anything else.
    records = read_cohort(options.slides, exclude_classes=options.exclude_classes)
    train_records, val_records = split_cohort(records, options.val_fraction, options.seed,
                                              where=str(options.slides))

    # 2. Resume point (state or weights), model and device.
    device = resolve_device(options.device)
    state_meta: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] | None = None
    warm_start = None
    if options.resume is not None:
        rp = Path(options.resume)
        if _state_json_path(rp) is not None:
            state_meta, tensors = load_training_state(rp)
        else:
            warm_start = read_checkpoint(rp)  # CheckpointError when neither
    if state_meta is not None:
        arch = state_meta["model"]["architecture"]
        name = state_meta["model"]["name"]
        if options.model and options.model != name:
            raise ValueError(f"--model {options.model} differs from the resumed run's model "
                             f"{name!r}; omit --model when resuming")
        try:
            model = build_architecture(arch, state_meta["model"]["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{options.resume}: cannot rebuild the model ({exc})") from None
        model.model_name = name
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state, strict=True)
        options.model = name
    elif warm_start is not None and not options.model:
        from ..models.checkpoints import load_checkpoint

        model = load_checkpoint(warm_start.weights_path)
        options.model = warm_start.model_name
        _warn(f"warm start from the weights of {warm_start.weights_path} (a model "
              f"checkpoint, not a training state: a new run, epochs start at 1)")
    else:
        if not options.model:
            raise ValueError("choose a model (--model magnet3, magnet4, magnet3-lite or ats)")
        if options.model not in known_models() or options.model == "demo":
            raise ValueError(f"unknown model {options.model!r}; trainable models: "
                             f"{', '.join(m for m in known_models() if m != 'demo')}")
        model = load_model(options.model, device="cpu", seed=options.seed)
        if warm_start is not None:
            from ..models.checkpoints import load_state_into

            load_state_into(model, warm_start)
            _warn(f"warm start from the weights of {warm_start.weights_path} (a model "
                  f"checkpoint, not a training state: a new run, epochs start at 1)")
    model = model.to(device)
    task = _make_task(model, options, device)
    batch_size = int(options.batch_size or task.default_batch_size())
    steps_per_epoch = max(math.ceil(len(train_records) / batch_size), 1)
    schedule = CosineSchedule(list(task.optimizers.values()), options.epochs * steps_per_epoch,
                              enabled=task.schedule_enabled)
    amp = device.type == "cuda"
    # bf16 has fp32's range (no overflow, no loss scaling); fp16 + GradScaler where it's absent.
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype(device) == torch.float16)
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    first_epoch = 1
    split = {"train": [str(r.path) for r in train_records],
             "val": [str(r.path) for r in val_records]}
    if state_meta is not None:
        for name, opt in task.optimizers.items():
            if name not in state_meta["optimizers"]:
                raise CheckpointError(f"{options.resume}: optimizer {name!r} missing from the "
                                      f"state (trained with another learning mode?)")
            opt.load_state_dict(_optimizer_from(name, state_meta["optimizers"][name], tensors))
        schedule.load_state_dict(state_meta["schedule"])
        schedule.total_steps = options.epochs * steps_per_epoch
        schedule._apply()
        if state_meta.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state_meta["scaler"])
        task.load_extra_state(state_meta.get("task", {}))
        history = [dict(r) for r in state_meta["history"]]
        best = dict(state_meta.get("best") or {})
        first_epoch = int(state_meta["epoch"]) + 1
        if state_meta.get("split") and set(state_meta["split"].get("val", [])) != \
                set(split["val"]):
            _warn("the validation split differs from the resumed run's (different CSV, seed "
                  "or --val-fraction)")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "split.json", json.dumps(
        {"train": split["train"], "val": split["val"],
         "train_classes": class_counts(train_records),
         "val_classes": class_counts(val_records)}, indent=1) + "\n")

    result = TrainResult(out=out, epochs_done=first_epoch - 1,
                         best_epoch=int(best.get("epoch", 0)), best_metric=best,
                         history=history, best_checkpoint=out / "best.safetensors"
                         if (out / "best.safetensors").is_file() else None)
    if first_epoch > options.epochs:
        _log(options, f"the run already has {first_epoch - 1} epoch(s) (asked for "
                      f"{options.epochs}); nothing to do")
        return result
    _log(options, f"training {options.model} on {len(train_records)} slides "
                  f"({class_counts(train_records)}), validating on {len(val_records)}; "
                  f"batch {batch_size}, lr {schedule.lr():.3g}, device {device}"
                  f"{', mixed precision' if amp else ''}; epochs {first_epoch}..{options.epochs}")

    pool, layer1_pool = slide_pools(len(train_records) + len(val_records), batch_size,
                                    options.workers, options.rule)
    train_set = SlideDataset(train_records, task.sizes, layer1_pool)
    val_set = SlideDataset(val_records, task.sizes, layer1_pool)
    # One thread per slide of the batch, up to half the cores (each slide's reader decodes
    # its chunks on two threads of its own).
    reader_pool = ThreadPoolExecutor(max(2, min(batch_size, (os.cpu_count() or 2) // 2)),
                                     thread_name_prefix="napari-magnet-train")
    train_loader = _Loader(train_set, batch_size, options.workers)
    val_loader = _Loader(val_set, batch_size, options.workers)
    epoch = first_epoch - 1
    try:
        for epoch in range(first_epoch, options.epochs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            order = _rng(options.seed, epoch).permutation(len(train_records)).tolist()
            train_loss, parts, train_probs, train_labels = _run_epoch(
                task, train_loader, train_records, order, batch_size, options, pool, reader_pool,
                train=True, epoch=epoch, amp=amp, scaler=scaler, schedule=schedule,
                desc=f"epoch {epoch}/{options.epochs}")
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss,
                                   "train_auroc": auroc(train_labels, train_probs),
                                   "lr": schedule.lr(), "steps": schedule.step_count}
            row.update({f"train_{k}": v for k, v in parts.items()})
            if val_records:
                val_loss, _, val_probs, val_labels = _run_epoch(
                    task, val_loader, val_records, list(range(len(val_records))), batch_size,
                    options, pool, reader_pool, train=False, epoch=epoch, amp=amp,
                    desc="validation")
                if not np.all(np.isfinite(val_probs)):
                    raise RuntimeError(
                        f"epoch {epoch}: the model gave non-finite validation probabilities "
                        f"({int((~np.isfinite(np.asarray(val_probs))).sum())} of "
                        f"{len(val_probs)} slides); its weights diverged. Resume from the "
                        f"last good state in {out} with a lower --lr, or train on the CPU")
                row.update(val_loss=val_loss, val_auroc=auroc(val_labels, val_probs),
                           val_accuracy=accuracy(val_labels, val_probs))
            else:
                row.update(val_loss=float("nan"), val_auroc=float("nan"),
                           val_accuracy=float("nan"))
            row["seconds"] = time.perf_counter() - t0
            row["cpu_seconds"] = time.process_time() - c0
            history.append(row)
            metric = {k: row[k] for k in ("val_auroc", "val_accuracy", "val_loss",
                                          "train_loss")}
            provenance = {"training": {"epoch": epoch, "cohort": str(options.slides),
                                       "train_slides": len(train_records),
                                       "val_slides": len(val_records),
                                       "metrics": _finite(metric)}}
            save_checkpoint(model, out / "last", notes=f"napari-magnet train, epoch {epoch}",
                            extra=provenance)
            if _is_better(metric, best):
                best = {"epoch": epoch, **_finite(metric)}
                save_checkpoint(model, out / "best",
                                notes=f"napari-magnet train, best epoch {epoch}",
                                extra=provenance)
            # The commit point of the epoch: train_state.json, replaced atomically.
            _save_state(out, model, task, schedule, scaler, epoch, best, history, options,
                        split)
            _write_metrics(out / "metrics.csv", history)
            plot_learning_curve(history, out / "learning_curve.png",
                                title=f"{options.model}: {out.name}")
            _log(options, f"epoch {epoch}/{options.epochs}: train loss {train_loss:.4f}, "
                          f"val loss {row['val_loss']:.4f}, val AUROC {row['val_auroc']:.3f}, "
                          f"val accuracy {row['val_accuracy']:.3f} ({row['seconds']:.0f} s, "
                          f"{row['cpu_seconds']:.0f} CPU s)")
    except KeyboardInterrupt:
        _log(options, f"\ninterrupted during epoch {epoch}; epochs up to {epoch - 1} are "
                      f"saved: resume with --resume {out}")
        raise
    finally:
        reader_pool.shutdown(wait=True)
        pool.close()
    # make sure the outputs exist even when resuming into a finished run
    _write_metrics(out / "metrics.csv", history)
    plot_learning_curve(history, out / "learning_curve.png", title=f"{options.model}: {out.name}")
    result.epochs_done = epoch
    result.history = history
    result.best_metric = best
    result.best_epoch = int(best.get("epoch", 0))
    result.best_checkpoint = out / "best.safetensors"
    result.last_checkpoint = out / "last.safetensors"
    result.metrics_csv = out / "metrics.csv"
    result.curve_png = out / "learning_curve.png"
    result.wall_seconds = time.perf_counter() - start_wall
    result.cpu_seconds = time.process_time() - start_cpu
    return result


def _finite(metric: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metric.items()}
