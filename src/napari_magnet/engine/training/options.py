"""What a training run is asked to do (:class:`TrainOptions`) and left (:class:`TrainResult`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainOptions", "TrainResult"]


@dataclass
class TrainOptions:
    """What :func:`~napari_magnet.engine.training.train` does (the CLI's ``train`` arguments).

    Not frozen, since callers adjust a built record before a run, but :func:`train` never
    modifies the caller's object: the model name a resumed run takes from its state goes
    into a copy (:func:`dataclasses.replace`).

    Attributes
    ----------
    slides : path
        Cohort CSV.
    out : path
        Run folder (created).
    model : str or None
        A registered model name
        (:func:`~napari_magnet.models.registry.listed_models`); taken from the state when
        resuming.
    epochs : int
        Total epochs of the run (a resumed run continues up to this number).
    batch_size : int or None
        Slides per step; default: the model family's (its task's ``default_batch_size()``).
    lr : float or None
        Learning rate; default: the model family's.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …
    resume : path or None
        A run folder or its ``train_state.json`` (full resume), or a model checkpoint
        (weights only: a warm start at epoch 0).
    val_fraction : float
        Fraction of each lesion class held out for validation (0 disables validation).
    seed : int
        Initial weights, split, shuffling, augmentation and sampling.
    family_options : mapping of str to object
        Options of the model family's training (its ``Family.train_options``, e.g. how an
        attention-sampling model learns its attention); a missing one takes its default.
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
    family_options: Mapping[str, Any] = field(default_factory=dict)
    augment: bool = True
    exclude_classes: tuple[str, ...] = ()
    workers: int = 0
    rule: str = "enough"
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        """The options as a JSON-ready dict.

        Returns
        -------
        dict
            Every field; paths as strings, ``exclude_classes`` as a list.
        """
        d = asdict(self)
        for k in ("slides", "out", "resume"):
            if d[k] is not None:
                d[k] = str(d[k])
        d["exclude_classes"] = list(self.exclude_classes)
        d["family_options"] = dict(self.family_options)
        return d


@dataclass(frozen=True)
class TrainResult:
    """What a run left behind.

    Attributes
    ----------
    out : Path
        The run folder.
    epochs_done : int
        Epochs completed (in this call and before it, when resumed).
    best_epoch : int
        Epoch of the best model (0: none yet).
    best_metric : dict
        Its validation AUROC, accuracy and loss, and its training loss.
    history : list of dict
        One row per epoch (the rows of ``metrics.csv``).
    best_checkpoint, last_checkpoint : Path or None
        The ``best.safetensors`` and ``last.safetensors`` model checkpoints.
    metrics_csv, curve_png : Path or None
        ``metrics.csv`` and ``learning_curve.png``.
    cpu_seconds, wall_seconds : float
        Process CPU and wall time of this call.
    """

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
