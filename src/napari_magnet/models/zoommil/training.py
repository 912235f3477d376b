"""Training ZoomMIL (and its ABMIL baseline) from feature bags: the family's training task.

``napari-magnet train --model zoommil --bags DIR --slides CSV`` (DESIGN §9). The model never
sees a pixel in training: each slide's features come from its bag file
(``DIR/<slide stem>.h5``, made by ``napari-magnet patch`` then ``napari-magnet embed`` with
the model's encoder), read once per run and kept in memory as float32 tensors. The slides
themselves are not opened (``reads_slides = False``, no layer-1 ``sizes``).

As the public code trains it (the anchor): Adam, lr 1e-4 (``options.lr`` overrides it), no
weight decay (the anchor's ``reg`` is 0); no cosine annealing but ReduceLROnPlateau on the
validation loss (factor 0.8, patience 5; on the training loss when there is no validation);
cross-entropy; class-weighted sampling of the training slides with replacement (as many draws
as slides, each class drawn equally often on average). Batch size 1 by default (bags differ
in size); a larger batch averages the per-slide losses. The perturbed top-K's noise is drawn
from the trainer's per-epoch generator, dropout from torch's per-epoch seeded global RNG: a
resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...engine.batches import optimizer_step
from ..family import TrainOption
from .model import encoder_mismatch

__all__ = [
    "DEFAULT_LR",
    "PLATEAU_FACTOR",
    "PLATEAU_PATIENCE",
    "TRAIN_OPTIONS",
    "ZoomMILTask",
    "class_weighted_order",
    "family_option",
]

#: The anchor's learning rate.
DEFAULT_LR = 1e-4
#: The anchor's ReduceLROnPlateau: the rate times 0.8 after 5 epochs without improvement.
PLATEAU_FACTOR = 0.8
PLATEAU_PATIENCE = 5

#: The family's ``napari-magnet train`` options.
TRAIN_OPTIONS = (
    TrainOption(
        "bags",
        None,
        "folder of the cohort's bag files (napari-magnet patch, then embed), one per slide "
        "named after it",
        type=str,
    ),
    TrainOption(
        "encoder_weights",
        None,
        "weights file of the model's encoder, the one the bags were embedded with "
        "(default: the encoder's own, e.g. napari-small's shipped weights)",
        type=str,
    ),
)
_DEFAULTS = {option.name: option.default for option in TRAIN_OPTIONS}


def family_option(options: Any, name: str) -> Any:
    """The value of this family's training option ``name`` in ``options`` (its default when
    the run did not set it)."""
    return dict(getattr(options, "family_options", None) or {}).get(name, _DEFAULTS[name])


def class_weighted_order(labels: np.ndarray, rng: np.random.Generator) -> list[int]:
    """``len(labels)`` draws with replacement, each slide weighted by ``1 / (slides of its
    class)``: every class is drawn equally often on average (the anchor's
    ``WeightedRandomSampler``).

    Parameters
    ----------
    labels : np.ndarray
        ``(n,)`` class of each training slide.
    rng : numpy.random.Generator
        The only source of randomness.

    Returns
    -------
    list of int
        Indices into ``labels``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if n == 0:
        return []
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum()).tolist()


def _make_hint(config) -> str:
    mpps = ",".join(f"{m:g}" for m in config.mpps)
    return (
        f"make it with `napari-magnet patch SLIDES… --mpp {mpps} --patch-size "
        f"{config.patch_size} --out PATCHES && napari-magnet embed --patches PATCHES "
        f"--encoder {config.encoder} --out BAGS` (then --bags BAGS)"
    )


class _BagFeatures:
    """One slide's features at the model's magnifications (float32, on the CPU), checked
    against the model's configuration; ``children(m, members)`` answers the model's zoom."""

    def __init__(self, path: Path, slide: Path, config, encoder_config=None) -> None:
        from ...bags.bagfile import BagError, read_bag

        if not path.is_file():
            raise ValueError(
                f"no bag file for slide {slide.name}: {path} does not exist; " + _make_hint(config)
            )
        try:
            bag = read_bag(path)
        except BagError as error:
            raise ValueError(f"{error}; {_make_hint(config)}") from None
        levels = []
        for mpp in config.mpps:
            try:
                levels.append(bag.level(mpp))
            except KeyError:
                have = ", ".join("?" if m is None else f"{m:g}" for m in bag.mpps)
                raise ValueError(
                    f"{path}: the bag has magnifications ({have}) µm per pixel; the model "
                    f"{config.name!r} needs {', '.join(f'{m:g}' for m in config.mpps)}; "
                    + _make_hint(config)
                ) from None
        positions = [bag.levels.index(level) for level in levels]
        self.features: list[torch.Tensor] = []
        for m, level in enumerate(levels):
            if level.patch_size != config.patch_size:
                raise ValueError(
                    f"{path}: patches of {level.patch_size} px at {level.mpp:g} µm per pixel; "
                    f"the model {config.name!r} takes {config.patch_size} px; " + _make_hint(config)
                )
            if level.features is None:
                raise ValueError(
                    f"{path}: no features at {level.mpp:g} µm per pixel (patched, not "
                    f"embedded); run `napari-magnet embed --patches {path.parent} "
                    f"--encoder {config.encoder} --out …`"
                )
            attrs = dict(level.attrs.get("features_attrs") or {})
            encoder = attrs.get("encoder")
            dim = int(level.features.shape[1]) if level.features.ndim == 2 else -1
            if encoder != config.encoder or dim != config.feature_dim:
                raise ValueError(
                    f"{path}: features made with encoder {encoder!r} ({dim}-d); the model "
                    f"{config.name!r} uses {config.encoder!r} ({config.feature_dim}-d): "
                    f"embed the bags with --encoder {config.encoder}"
                )
            reason = encoder_mismatch(attrs, config.encoder, encoder_config or {})
            if reason is not None:
                raise ValueError(
                    f"{path}: features {reason}: embed the bags again with "
                    f"napari-magnet embed --overwrite"
                )
            if m > 0:
                c = config.fan_out(m - 1) ** 2
                expected = np.repeat(np.arange(len(levels[m - 1]), dtype=np.int64), c)
                if (
                    positions[m] != positions[m - 1] + 1
                    or level.parent is None
                    or len(level.parent) != len(expected)
                    or (level.parent != expected).any()
                ):
                    raise ValueError(
                        f"{path}: the patches at {level.mpp:g} µm per pixel are not the "
                        f"{c} children of each patch at {levels[m - 1].mpp:g}, contiguous "
                        f"(not a bag of napari-magnet patch --mpp "
                        f"{','.join(f'{v:g}' for v in config.mpps)}?)"
                    )
            self.features.append(torch.from_numpy(np.asarray(level.features, dtype=np.float32)))
        if len(self.features[0]) == 0:
            raise ValueError(f"{path}: no patches at {levels[0].mpp:g} µm per pixel (no tissue?)")
        self.fan = [config.fan_out(m) ** 2 for m in range(len(levels) - 1)]

    def children_fn(self, device: torch.device):
        """The model's ``children(m, members)``: rows ``p * c + arange(c)`` of level m+1."""

        def children(m: int, members: torch.Tensor) -> torch.Tensor:
            c = self.fan[m]
            rows = members.detach().long().cpu()[:, None] * c + torch.arange(c)
            table = self.features[m + 1]
            return table[rows.reshape(-1)].reshape(len(rows), c, table.shape[1]).to(device)

        return children


class ZoomMILTask:
    """Forward, loss, optimizer and plateau rule of a ZoomMIL model trained from bags.

    Parameters
    ----------
    model : ZoomMIL
        The model (its frozen ``encoder`` is not optimised).
    options : TrainOptions
        ``family_options["bags"]`` (required), ``family_options["encoder_weights"]`` (the
        weights file the bags were embedded with, loaded into the model's encoder) and ``lr``
        are used.
    device : torch.device
        Where the model runs.

    Raises
    ------
    ValueError
        No bag folder given, or it is not a folder.
    """

    reads_slides = False

    def __init__(self, model, options: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.config = model.config
        bags = family_option(options, "bags")
        if not bags:
            raise ValueError(
                f"training a {self.config.name} model needs --bags DIR, the folder of the "
                f"cohort's bag files with features; {_make_hint(self.config)}"
            )
        weights = family_option(options, "encoder_weights")
        if weights:  # before the bags are checked against the model's encoder
            model.load_encoder_weights(Path(weights).expanduser())
            self.config = model.config
        self.bags_dir = Path(bags).expanduser()
        if not self.bags_dir.is_dir():
            raise ValueError(f"--bags {self.bags_dir} is not a folder; {_make_hint(self.config)}")
        self.sizes: tuple[int, ...] = ()
        lr = DEFAULT_LR if options.lr is None else float(options.lr)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizers = {"adam": torch.optim.Adam(params, lr=lr, weight_decay=0.0)}
        self.schedule_enabled = False
        # eps=0: a reduction applies at any rate (torch's default drops those under 1e-8).
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizers["adam"],
            mode="min",
            factor=PLATEAU_FACTOR,
            patience=PLATEAU_PATIENCE,
            eps=0.0,
        )
        self._bags: dict[Path, _BagFeatures] = {}

    def default_batch_size(self) -> int:
        """1: bags differ in size."""
        return 1

    def epoch_order(self, labels: np.ndarray, rng: np.random.Generator) -> list[int]:
        """Class-weighted draws with replacement (:func:`class_weighted_order`)."""
        return class_weighted_order(labels, rng)

    def bag(self, slide: Path) -> _BagFeatures:
        """The checked features of ``slide``'s bag (read on first use, then kept)."""
        from ...bags.patching import bag_path_for

        path = bag_path_for(slide, self.bags_dir)
        if path not in self._bags:
            # Not inference tensors even when first read in validation: the cache outlives it.
            with torch.inference_mode(False):
                self._bags[path] = _BagFeatures(
                    path, Path(slide), self.config, getattr(self.model, "encoder_config", None)
                )
        return self._bags[path]

    def loss(self, images, labels, batch, generator, amp: bool):
        """Mean cross-entropy over the batch's slides.

        Parameters
        ----------
        images : list
            Empty (no slide is rendered).
        labels : Tensor
            ``(B,)`` slide labels.
        batch
            The step's slides (``records``).
        generator : torch.Generator
            Drives the perturbed top-K's noise (training).
        amp : bool
            Run the forward under autocast.

        Returns
        -------
        loss : Tensor
            Scalar to back-propagate.
        parts : dict
            ``{"classification": …}``.
        probability : Tensor
            ``(B,)`` probability of the last class, on the CPU.
        """
        from ...engine.batches import amp_dtype

        targets = labels.to(self.device).long()
        losses, probs = [], []
        for b, record in enumerate(batch.records):
            feats = self.bag(record.path)
            first = feats.features[0].to(self.device, non_blocking=True)
            with torch.autocast(
                device_type=self.device.type, dtype=amp_dtype(self.device), enabled=amp
            ):
                out = self.model(first, feats.children_fn(self.device), generator)
            logits = out.logits.float().reshape(1, -1)
            losses.append(F.cross_entropy(logits, targets[b : b + 1]))
            probs.append(torch.softmax(logits.detach(), dim=1)[0, -1].cpu())
        loss = torch.stack(losses).mean()
        return loss, {"classification": float(loss.detach())}, torch.stack(probs)

    def backward_step(self, loss, scaler, schedule) -> None:
        """Zero, back-propagate (through ``scaler``), step Adam; count the step."""
        optimizer_step(self.optimizers, loss, scaler, schedule)

    def end_epoch(self, metrics: dict[str, Any]) -> None:
        """The plateau rule on the epoch's validation loss (training loss without one)."""
        value = metrics.get("val_loss")
        if value is None or not math.isfinite(float(value)):
            value = metrics.get("train_loss")
        if value is not None and math.isfinite(float(value)):
            self.plateau.step(float(value))

    def extra_state(self) -> dict[str, Any]:
        """The plateau rule's state (JSON-safe)."""
        state = self.plateau.state_dict()
        return {"plateau": {k: state[k] for k in _PLATEAU_KEYS if k in state}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` (the learning rate itself comes back with Adam's)."""
        saved = state.get("plateau")
        if saved:
            current = self.plateau.state_dict()
            current.update({k: v for k, v in saved.items() if k in _PLATEAU_KEYS})
            self.plateau.load_state_dict(current)


# What a resumed plateau rule needs (not the optimizer nor torch-private bookkeeping).
_PLATEAU_KEYS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch", "_last_lr")
