"""Train the ``napari-small`` patch encoder on synthetic slides (``python -m`` this module).

::

    python -m napari_magnet.bags.train_encoder --slides cohort.csv --out encoder.safetensors \\
        [--minutes 10] [--seed 0] [--max-slides N]

``--slides`` may also name the cohort's folder: its ``*.tif`` slides that have a sidecar, in
name order (a cohort still being generated).

Patches of 64 pixels are sampled at 8, 4, 2 and 1 µm per pixel from every slide of a cohort
made by ``napari-magnet synth`` and read through the pyramid as :mod:`.pixels` reads a bag's
patches. Each is labelled from the slide's ground truth: *lesion* when at least
``lesion_min`` of it lies inside tumour lesions (so that a coarse patch which holds a small
lesion can count as a lesion patch), *normal* when none of it does and at least half of it is
tissue, *glass* when less than 5 % of it is tissue (the tissue rule of :mod:`.tissue`, applied
to the patch's own pixels); the rest are not used. Candidates are drawn uniformly over the
slide and around every lesion and look-alike distractor (centred in its box, and as many
again placed so that the box's centre falls anywhere in the patch), so the network sees
lesions away from a patch's centre and dense normal tissue that is coloured like tumour.

The lesions' outlines are not in the sidecar (only their boxes): they are laid out again from
the slide's seed with :mod:`napari_magnet.synth.layout`, and a slide whose re-laid boxes do
not match its sidecar falls back to the ellipse inscribed in each box, shrunk (conservative).

Slides are split into training and held-out slides. :class:`~.small_encoder.SmallEncoder`
plus a linear head learn the three classes with Adam, class-balanced batches, random flips,
rotations and a mild colour jitter, for a time budget (cosine learning-rate decay over it).
The encoder's weights (the head is dropped) are written atomically as safetensors, with a
JSON beside them: the cohort, the patches, steps and epochs, the held-out accuracy, the date
and the command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..engine.cohort import read_cohort
from ..io.atomic import atomic_path, atomic_write_json
from ..io.coverage import tissue_mask
from ..slide import open_slide
from ..synth.layout import lesion_layout
from ..synth.spec import SyntheticSlideInfo, sidecar_path
from ..synth.truth import read_ground_truth
from .encoders import Normalised
from .grid import plan_magnifications
from .pixels import iter_patch_batches
from .records import BagLevel
from .small_encoder import FEATURE_DIM, SMALL_MEAN, SMALL_STD, SmallEncoder
from .tissue import TissueOptions

__all__ = [
    "CLASSES",
    "MPPS",
    "PatchSet",
    "lesion_fields",
    "main",
    "sample_slide_patches",
    "train_encoder",
]

#: Patch classes, in the order of the head's outputs.
CLASSES: tuple[str, ...] = ("glass", "normal", "lesion")
#: Target µm per pixel the patches are sampled at.
MPPS: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0)
PATCH = 64
_GRID = 32  # lesion-membership samples per patch side
#: Default share of a patch inside lesions that makes it a *lesion* patch: 2 %, so that at
#: 8 µm/px a patch holding a lesion of 0.1 mm (about 12 px of 64) is one. With half the patch
#: (the rule before) the encoder learned to call such coarse patches normal, and a model
#: choosing where to zoom from them missed most isolated tumour cells.
LESION_MIN = 0.02


class PatchSet:
    """Labelled patches: ``pixels`` (N, 64, 64, 3) uint8, ``labels``, ``mpps``, ``slides``."""

    def __init__(self, pixels, labels, mpps, slides) -> None:
        self.pixels = np.asarray(pixels, np.uint8).reshape(-1, PATCH, PATCH, 3)
        self.labels = np.asarray(labels, np.int64).reshape(-1)
        self.mpps = np.asarray(mpps, np.float32).reshape(-1)
        self.slides = np.asarray(slides, np.int64).reshape(-1)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def concat(cls, parts: Sequence[PatchSet]) -> PatchSet:
        """One set from several (an empty list gives an empty set)."""
        if not parts:
            return cls(np.zeros((0, PATCH, PATCH, 3), np.uint8), [], [], [])
        return cls(
            np.concatenate([p.pixels for p in parts]),
            np.concatenate([p.labels for p in parts]),
            np.concatenate([p.mpps for p in parts]),
            np.concatenate([p.slides for p in parts]),
        )

    def counts(self) -> dict[str, int]:
        """Patches per class."""
        return {c: int((self.labels == i).sum()) for i, c in enumerate(CLASSES)}


def lesion_fields(info: SyntheticSlideInfo) -> tuple[list, bool]:
    """The tumour lesions' outlines of a synthetic slide, laid out again from its seed.

    Parameters
    ----------
    info : SyntheticSlideInfo
        The slide's ground truth (its sidecar).

    Returns
    -------
    outlines : list
        One ``(ox, oy, cell, field)`` per tumour lesion: ``field`` is a grid of signed
        distances, positive inside, whose sample ``(0, 0)`` lies at level-0 ``(ox, oy)``,
        ``cell`` level-0 pixels apart.
    exact : bool
        Whether the re-laid lesions match the sidecar's boxes; when not, each outline is the
        ellipse inscribed in its box, shrunk to 70 %.
    """
    width, height, mpp = info.width, info.height, info.mpp
    try:
        renders = lesion_layout(width, height, mpp, info.seed, info.label, info.lesion_kind)
        exact = len(renders) == len(info.lesions) and all(
            r.lesion.kind == t.kind and np.allclose(r.lesion.box, t.box, atol=1e-3)
            for r, t in zip(renders, info.lesions)
        )
    except (ValueError, TypeError, IndexError):
        exact = False
    if exact:
        return [(r.ox, r.oy, r.cell, r.field) for r in renders if r.lesion.is_tumour], True
    outlines = []
    for lesion in info.tumour_lesions:
        x0, y0, x1, y1 = lesion.box
        step = max(x1 - x0, y1 - y0) / 64.0
        gx, gy = np.arange(65) * step + x0, np.arange(65) * step + y0
        u = (gx[None, :] - (x0 + x1) / 2) / (0.35 * (x1 - x0))
        v = (gy[:, None] - (y0 + y1) / 2) / (0.35 * (y1 - y0))
        outlines.append((x0, y0, step, (1.0 - np.hypot(u, v)).astype(np.float32)))
    return outlines, False


def _lesion_fraction(outlines: list, x: float, y: float, extent: float) -> float:
    """Share of a patch's sample points (a 32 × 32 grid) inside any tumour lesion."""
    pts = x + (np.arange(_GRID) + 0.5) * extent / _GRID
    qts = y + (np.arange(_GRID) + 0.5) * extent / _GRID
    inside = np.zeros((_GRID, _GRID), bool)
    for ox, oy, cell, field in outlines:
        cols = np.rint((pts - ox) / cell).astype(np.int64)
        rows = np.rint((qts - oy) / cell).astype(np.int64)
        ok_c = (cols >= 0) & (cols < field.shape[1])
        ok_r = (rows >= 0) & (rows < field.shape[0])
        values = field[np.clip(rows, 0, field.shape[0] - 1)][
            :, np.clip(cols, 0, field.shape[1] - 1)
        ]
        inside |= (values > 0) & ok_r[:, None] & ok_c[None, :]
    return float(inside.mean())


def _candidates(
    rng: np.random.Generator, info: SyntheticSlideInfo, extent: float, per_box: int, uniform: int
) -> np.ndarray:
    """``(n, 2)`` level-0 top-left corners: uniform ones, and per lesion box ones centred in
    it and as many again that hold the box's centre anywhere in the patch."""
    w, h = info.width, info.height
    xy = [rng.uniform((0, 0), (max(w - extent, 1), max(h - extent, 1)), size=(uniform, 2))]
    for lesion in info.lesions:
        x0, y0, x1, y1 = lesion.box
        n = per_box if lesion.is_tumour else max(1, per_box // 2)
        centres = rng.uniform((x0, y0), (x1, y1), size=(n, 2))
        xy.append(centres - extent / 2)
        middle = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        xy.append(middle - rng.uniform(0.0, extent, size=(n, 2)))
    corners = np.concatenate(xy)
    corners[:, 0] = np.clip(corners[:, 0], 0, max(w - extent, 0))
    corners[:, 1] = np.clip(corners[:, 1], 0, max(h - extent, 0))
    return np.floor(corners).astype(np.int64)


def sample_slide_patches(
    slide_path: str | Path,
    rng: np.random.Generator,
    *,
    mpps: Sequence[float] = MPPS,
    per_box: int = 8,
    uniform: int = 8,
    lesion_min: float = LESION_MIN,
    slide_index: int = 0,
) -> PatchSet:
    """Labelled 64-px patches of one synthetic slide at several pixel sizes.

    Parameters
    ----------
    slide_path : path-like
        The slide; its ``.truth.json`` sidecar must lie beside it.
    rng : numpy.random.Generator
        Draws the candidate positions.
    mpps : sequence of float
        Target µm per pixel, coarsest first, each the previous one divided by an integer.
    per_box : int
        Candidates centred in each tumour lesion's box per pixel size (half as many in each
        distractor's box).
    uniform : int
        Candidates drawn uniformly over the slide per pixel size.
    lesion_min : float
        Share of a patch inside tumour lesions from which it is a *lesion* patch (in (0, 1]).
    slide_index : int
        Stored in :attr:`PatchSet.slides`.

    Returns
    -------
    PatchSet
        The candidates that fall in a class (see the module docstring).
    """
    info = read_ground_truth(slide_path)
    outlines, _ = lesion_fields(info)
    rule = TissueOptions()
    pixels, labels, sizes = [], [], []
    with open_slide(slide_path) as slide:
        plans = plan_magnifications(slide.geometry, slide.mpp or (info.mpp,) * 2, mpps, PATCH)
        for plan in plans:
            corners = _candidates(rng, info, plan.extent[0], per_box, uniform)
            level = BagLevel(
                name=f"mpp_{plan.mpp:g}",
                coords=corners,
                extent=plan.extent,
                patch_size=PATCH,
                mpp=plan.mpp,
                patch_level=plan.patch_level,
            )
            for idx, batch in iter_patch_batches(slide, level, batch_size=len(corners)):
                for i, patch in zip(idx, batch):
                    tissue = tissue_mask(patch, rule.white, rule.black, rule.grey_tolerance)
                    tf = float(tissue.mean())
                    lf = _lesion_fraction(outlines, *corners[i], plan.extent[0])
                    if lf >= lesion_min:
                        label = 2
                    elif lf == 0.0 and tf >= 0.5:
                        label = 1
                    elif lf == 0.0 and tf < 0.05:
                        label = 0
                    else:
                        continue
                    pixels.append(patch)
                    labels.append(label)
                    sizes.append(plan.mpp)
    if not labels:
        return PatchSet.concat([])
    return PatchSet(np.stack(pixels), labels, sizes, [slide_index] * len(labels))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random dihedral transform per patch and a mild per-channel gain and offset."""
    b = x.shape[0]
    flips = torch.rand((3, b), generator=gen) < 0.5
    x = torch.where(flips[0, :, None, None, None], x.flip(-1), x)
    x = torch.where(flips[1, :, None, None, None], x.flip(-2), x)
    x = torch.where(flips[2, :, None, None, None], x.transpose(-1, -2), x)
    x = x.float().div_(255.0)
    gain = 1.0 + 0.08 * (2 * torch.rand((b, 3, 1, 1), generator=gen) - 1)
    shift = 0.04 * (2 * torch.rand((b, 1, 1, 1), generator=gen) - 1)
    return (x * gain + shift).clamp_(0.0, 1.0)


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))


@torch.inference_mode()
def _predict(model: nn.Module, pixels: np.ndarray, batch: int = 512) -> np.ndarray:
    model.eval()
    out = [
        model(_to_tensor(pixels[i : i + batch])).argmax(1).numpy()
        for i in range(0, len(pixels), batch)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _accuracy(pred: np.ndarray, held: PatchSet) -> dict:
    """Accuracy, balanced accuracy, recall per class and per pixel size, confusion matrix."""
    if not len(held):
        return {"patches": 0}
    labels = held.labels
    recall = {
        c: float((pred[labels == i] == i).mean())
        for i, c in enumerate(CLASSES)
        if (labels == i).any()
    }
    confusion = np.zeros((len(CLASSES), len(CLASSES)), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    return {
        "patches": int(len(labels)),
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "recall": recall,
        "accuracy_by_mpp": {
            f"{m:g}": float((pred[held.mpps == m] == labels[held.mpps == m]).mean())
            for m in sorted(set(held.mpps.tolist()), reverse=True)
        },
        "confusion": confusion.tolist(),
        "chance": float(np.bincount(labels).max() / len(labels)),
    }


def train_encoder(
    slides: Sequence[Path],
    out: str | Path,
    *,
    minutes: float = 10.0,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    held_out: float = 0.15,
    per_box: int = 8,
    uniform: int = 8,
    lesion_min: float = LESION_MIN,
    provenance: dict | None = None,
    log=print,
) -> dict:
    """Sample patches, train the encoder and its head, write the encoder's weights.

    Parameters
    ----------
    slides : sequence of Path
        Synthetic slides, each with its ``.truth.json`` sidecar.
    out : path-like
        The safetensors file; the JSON record goes beside it (``.json``).
    minutes : float
        Time budget of the optimisation (patch sampling comes before it).
    seed : int
        Seeds the slide split, the sampling, the initialisation and the batches.
    steps : int, optional
        Stop after this many steps even within the budget.
    batch_size, lr : int, float
        Patches per step; Adam's initial learning rate (cosine decay to 0 over the budget).
    held_out : float
        Fraction of the slides (at least one when there are two or more) kept for the
        held-out accuracy.
    per_box, uniform : int
        Sampling density, see :func:`sample_slide_patches`.
    lesion_min : float
        Labelling rule, see :func:`sample_slide_patches`.
    provenance : dict, optional
        Added to the JSON record (the cohort, the command).
    log : callable
        Progress lines.

    Returns
    -------
    dict
        The JSON record.
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    slides = [Path(s) for s in slides]
    if not slides:
        raise ValueError("no slides to train on")
    if not 0.0 < float(lesion_min) <= 1.0:
        raise ValueError(f"lesion_min must lie in (0, 1], not {lesion_min}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xE4C]))
    order = rng.permutation(len(slides))
    n_held = 0 if len(slides) < 2 else max(1, int(round(held_out * len(slides))))
    held_ids = set(order[:n_held].tolist())
    t0 = time.perf_counter()
    parts = []
    for i, path in enumerate(slides):
        slide_rng = np.random.default_rng(np.random.SeedSequence([int(seed), i]))
        parts.append(
            sample_slide_patches(
                path,
                slide_rng,
                per_box=per_box,
                uniform=uniform,
                lesion_min=lesion_min,
                slide_index=i,
            )
        )
        if (i + 1) % 50 == 0:
            log(f"sampled {i + 1}/{len(slides)} slides, {sum(len(p) for p in parts)} patches")
    every = PatchSet.concat(parts)
    is_held = np.isin(every.slides, list(held_ids))
    train = PatchSet(
        every.pixels[~is_held], every.labels[~is_held], every.mpps[~is_held], every.slides[~is_held]
    )
    held = PatchSet(
        every.pixels[is_held], every.labels[is_held], every.mpps[is_held], every.slides[is_held]
    )
    sampling_s = time.perf_counter() - t0
    log(f"patches: train {train.counts()}, held-out {held.counts()} ({sampling_s:.0f} s)")
    if not len(train):
        raise ValueError("the slides gave no labelled patches")

    torch.manual_seed(int(seed))
    encoder = SmallEncoder()
    model = nn.Sequential(
        Normalised(encoder, SMALL_MEAN, SMALL_STD), nn.Linear(FEATURE_DIM, len(CLASSES))
    )
    model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-5)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(int(seed))
    pixels = _to_tensor(train.pixels)
    labels = torch.from_numpy(train.labels)
    counts = np.bincount(train.labels, minlength=len(CLASSES)).astype(np.float64)
    weights = torch.from_numpy(np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)[train.labels])
    budget = max(1e-3, float(minutes) * 60.0)
    step, losses, t1 = 0, [], time.perf_counter()
    model.train()
    while True:
        elapsed = time.perf_counter() - t1
        progress = elapsed / budget if steps is None else max(elapsed / budget, step / steps)
        if progress >= 1.0:
            break
        for group in optimiser.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
        batch = _augment(pixels[idx], gen).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(batch), labels[idx])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
        if step % 200 == 0:
            log(f"step {step}: loss {np.mean(losses[-200:]):.3f} ({elapsed:.0f} s)")
    train_s = time.perf_counter() - t1
    held_metrics = _accuracy(_predict(model, held.pixels), held)
    train_metrics = _accuracy(
        _predict(model, train.pixels[:4096]),
        PatchSet(train.pixels[:4096], train.labels[:4096], train.mpps[:4096], train.slides[:4096]),
    )
    log(f"held-out accuracy {held_metrics.get('accuracy', float('nan')):.3f} ({step} steps)")

    out = Path(out)
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"encoder": "napari-small", "format": "pt"})
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    record = {
        "encoder": "napari-small",
        "weights_file": out.name,
        "weights_sha256": digest,
        "parameters": int(sum(v.numel() for v in encoder.parameters())),
        "classes": list(CLASSES),
        "mpps": list(MPPS),
        "patch_size": PATCH,
        "slides": {"train": len(slides) - n_held, "held_out": n_held},
        "patches": {"train": train.counts(), "held_out": held.counts()},
        "steps": step,
        "batch_size": int(batch_size),
        "epochs": round(step * batch_size / len(train), 2),
        "final_loss": float(np.mean(losses[-100:])) if losses else None,
        "held_out": held_metrics,
        "train_subset": {k: train_metrics.get(k) for k in ("patches", "accuracy")},
        "seconds": {"sampling": round(sampling_s, 1), "training": round(train_s, 1)},
        "seed": int(seed),
        "lr": float(lr),
        "lesion_min": float(lesion_min),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "notes": "Trained on synthetic slides only; knows nothing of real tissue.",
        **(provenance or {}),
    }
    atomic_write_json(out.with_suffix(".json"), record, indent=1)
    return record


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m napari_magnet.bags.train_encoder",
        description="Train the napari-small patch encoder on a synthetic cohort.",
    )
    parser.add_argument(
        "--slides",
        required=True,
        help="cohort CSV made by napari-magnet synth, or its folder (the slides with a sidecar)",
    )
    parser.add_argument("--out", required=True, help="output .safetensors (JSON written beside)")
    parser.add_argument("--minutes", type=float, default=10.0, help="optimisation time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-slides", type=int, default=None, help="use the first N slides")
    parser.add_argument("--per-box", type=int, default=8, help="candidates per lesion box")
    parser.add_argument("--uniform", type=int, default=8, help="uniform candidates per size")
    parser.add_argument(
        "--lesion-min",
        type=float,
        default=LESION_MIN,
        help="share of a patch inside lesions that makes it a lesion patch",
    )
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    source = Path(args.slides)
    if source.is_dir():  # a cohort still being generated: the slides whose sidecar exists
        paths = sorted(p for p in source.glob("*.tif") if sidecar_path(p).is_file())
    else:
        paths = [r.path for r in read_cohort(source, require_both_labels=False)]
    paths = paths[: args.max_slides]
    if not paths:
        print(f"error: no slides in {source}", file=sys.stderr)
        return 2
    missing = [p.name for p in paths if not sidecar_path(p).is_file()]
    if missing:
        print(
            f"error: {len(missing)} slides have no .truth.json sidecar ({missing[0]} …)",
            file=sys.stderr,
        )
        return 2
    record = train_encoder(
        paths,
        args.out,
        minutes=args.minutes,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        per_box=args.per_box,
        uniform=args.uniform,
        lesion_min=args.lesion_min,
        provenance={
            "cohort": str(Path(args.slides).resolve()),
            "command": "python -m napari_magnet.bags.train_encoder " + shlex.join(argv),
        },
        log=(lambda *_: None) if args.quiet else (lambda line: print(line, flush=True)),
    )
    held = record["held_out"]
    print(
        f"wrote {args.out}: held-out accuracy {held.get('accuracy', float('nan')):.3f} "
        f"on {held.get('patches', 0)} patches, {record['steps']} steps"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
