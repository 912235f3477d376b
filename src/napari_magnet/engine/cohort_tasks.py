"""The per-slide tasks :func:`~.cohort_run.run_cohort` runs: patching and headless magnify.

Each task is a frozen dataclass (pickled to the workers) following the
:class:`~.cohort_run.SlideTask` contract. :class:`PatchTask` writes ``<stem>.h5`` bag files
(:func:`napari_magnet.bags.patching.patch_slide`); :class:`MagnifyTask` writes the export
folder ``<out>/<stem>/`` that ``napari-magnet magnify --out`` writes, built under a hidden
temporary name and renamed into place once complete, so a folder with a valid
``result.json`` is always a whole run. Imports torch only inside :class:`MagnifyTask`.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bags.patching import PatchOptions, bag_path_for, patch_slide
from .cohort_run import TaskOutcome, worker_device

__all__ = ["EmbedTask", "EvaluateTask", "MagnifyTask", "PatchTask", "run_folder_for"]

_MODELS: dict[tuple[str, str, int], Any] = {}  # per worker process: loaded once
_ENCODERS: dict[tuple, Any] = {}  # per worker process: built once


def _model(name: str, device: str) -> Any:
    """The model, loaded once per worker process and device."""
    from ..models.registry import load_model

    key = (str(name), device, 0)
    if key not in _MODELS:
        _MODELS[key] = load_model(name, device=device)
    return _MODELS[key]


@dataclass(frozen=True)
class PatchTask:
    """Patch one slide into ``<out_dir>/<slide stem>.h5``.

    Parameters
    ----------
    out_dir : str
        Folder of the bag files (shared storage on a cluster).
    options : PatchOptions
        How slides are patched.
    overwrite : bool
        Rewrite valid existing bag files instead of skipping their slides.
    """

    out_dir: str
    options: PatchOptions = field(default_factory=PatchOptions)
    overwrite: bool = False
    gpu: bool = False

    def output_for(self, slide: str) -> Path:
        """``<out_dir>/<stem>.h5``."""
        return bag_path_for(slide, self.out_dir)

    def done(self, slide: str) -> bool:
        """The bag file exists and validates with the same options."""
        from ..bags.bagfile import validate_bag

        output = self.output_for(slide)
        return (
            not self.overwrite
            and output.exists()
            and not validate_bag(output, self.options.config())
        )

    def recorded(self, slide: str) -> dict[str, Any]:
        """Nothing beyond the file itself."""
        return {}

    def run(self, slide: str) -> TaskOutcome:
        """:func:`patch_slide` (which never raises), as a :class:`TaskOutcome`; first removes
        the temporary file a dead attempt at this slide may have left."""
        output = self.output_for(slide)
        for stale in output.parent.glob(f".{output.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        o = patch_slide(slide, output, self.options, self.overwrite)
        return TaskOutcome(
            str(slide), str(o.output), o.status, o.seconds, o.reason, {"patches": list(o.patches)}
        )


def run_folder_for(slide: str, out_dir: str | Path) -> Path:
    """``<out_dir>/<slide stem>``: a slide's export folder."""
    return Path(out_dir) / Path(slide).stem


def _read_result(folder: Path) -> dict | None:
    """``result.json`` of a complete export folder, else None."""
    from ..io.results import RESULT_FORMAT

    try:
        data = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        return None
    if not isinstance(data.get("result"), dict):
        return None
    if not all((folder / name).is_file() for name in data.get("files", [])):
        return None
    return data


def _clear_leftovers(folder: Path) -> None:
    """Remove the hidden folders a dead attempt at ``folder`` may have left."""
    for stale in folder.parent.glob(f".{folder.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _swap_in(built: Path, folder: Path) -> None:
    """Rename the complete ``built`` folder onto ``folder`` (an older one is removed)."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex}")
        folder.rename(old)
    built.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class MagnifyTask:
    """Run a model on one slide and export the run into ``<out_dir>/<slide stem>/``.

    Parameters
    ----------
    out_dir : str
        Folder of the per-slide export folders (shared storage on a cluster).
    model : str
        A model name, ``demo`` or a checkpoint path (seen by the workers).
    device : str
        ``auto`` (a GPU per worker when present, see :func:`~.cohort_run.worker_device`),
        ``cpu`` or ``cuda[:i]``.
    rule, seed, n_patches, aux_heads
        As ``napari-magnet magnify``.
    overwrite : bool
        Redo slides whose export folder is complete.
    """

    out_dir: str
    model: str = "magnet3"
    device: str = "auto"
    rule: str = "enough"
    seed: int = 0
    n_patches: int | None = None
    aux_heads: bool = True
    overwrite: bool = False
    gpu: bool = True

    def output_for(self, slide: str) -> Path:
        """``<out_dir>/<stem>``."""
        return run_folder_for(slide, self.out_dir)

    def done(self, slide: str) -> bool:
        """The export folder holds a valid ``result.json`` and every file it lists, made by
        this model (the same checkpoint and configuration): a folder another model made is
        redone."""
        if self.overwrite:
            return False
        data = _read_result(self.output_for(slide))
        if data is None:
            return False
        model = self._load(worker_device(self.device))
        result = data["result"]
        return (
            result.get("checkpoint_sha256", "") == getattr(model, "checkpoint_sha256", "")
            and result.get("config_hash", "") == model.config.config_hash()
        )

    def recorded(self, slide: str) -> dict[str, Any]:
        """The probability of the finished run."""
        data = _read_result(self.output_for(slide)) or {}
        probability = (data.get("result") or {}).get("probability")
        return {} if probability is None else {"probability": float(probability)}

    def _load(self, device: str) -> Any:
        return _model(self.model, device)

    def run(self, slide: str) -> TaskOutcome:
        """Magnify the slide and export it; a bad slide or model is a failed outcome."""
        from ..models.checkpoints import CheckpointError
        from ..slide import SlideError

        start = time.perf_counter()
        folder = self.output_for(slide)
        try:
            probability = self._export(slide, folder)
        except (SlideError, CheckpointError, ValueError, OSError) as error:
            text = str(error) or type(error).__name__
            return TaskOutcome(str(slide), str(folder), "failed", time.perf_counter() - start, text)
        return TaskOutcome(
            str(slide),
            str(folder),
            "written",
            time.perf_counter() - start,
            values={"probability": probability},
        )

    def _export(self, slide: str, folder: Path) -> float:
        from ..engine.magnify import magnify
        from ..engine.types import MagnifyResult
        from ..io.results import export_run
        from ..slide import open_slide

        device = worker_device(self.device)
        model = self._load(device)
        folder.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(folder)
        built = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex}")
        try:
            with open_slide(slide) as opened:
                steps, result = [], None
                for item in magnify(
                    opened,
                    model,
                    device=device,
                    rule=self.rule,
                    n_patches=self.n_patches,
                    seed=self.seed,
                    aux_heads=self.aux_heads,
                ):
                    if isinstance(item, MagnifyResult):
                        result = item
                    else:
                        steps.append(item)
                if result is None:
                    raise ValueError(f"{Path(slide).name}: the run gave no result")
                export_run(built, opened.requested_path, opened.mpp, steps, result)
            _swap_in(built, folder)
        finally:
            if built.exists():
                shutil.rmtree(built, ignore_errors=True)
        return float(result.probability)


@dataclass(frozen=True)
class EvaluateTask:
    """Evaluate a model on one slide of a cohort (``evaluate --scheduler``); writes nothing,
    so nothing is skipped: the evaluation's outcome is ``values["evaluation"]``.

    Parameters
    ----------
    records : tuple of SlideRecord
        The cohort (from :func:`~.cohort.read_cohort`); slides are looked up by path.
    model, device, rule, seed
        As ``napari-magnet evaluate``.
    """

    records: tuple
    model: str = "demo"
    device: str = "auto"
    rule: str = "enough"
    seed: int = 0
    gpu: bool = True

    def output_for(self, slide: str) -> Path:
        """The slide itself (nothing is written)."""
        return Path(slide)

    def done(self, slide: str) -> bool:
        """Never: an evaluation keeps no per-slide output."""
        return False

    def recorded(self, slide: str) -> dict[str, Any]:
        """Nothing."""
        return {}

    def run(self, slide: str) -> TaskOutcome:
        """:func:`~.evaluation.evaluate_cohort` of this one slide."""
        from ..slide import SlideError
        from .evaluation import evaluate_cohort

        start = time.perf_counter()
        record = next(r for r in self.records if str(r.path) == str(slide))
        device = worker_device(self.device)
        try:
            model = _model(self.model, device)
            (outcome,) = evaluate_cohort([record], model, device, rule=self.rule, seed=self.seed)
        except (SlideError, ValueError, OSError) as error:
            text = str(error) or type(error).__name__
            return TaskOutcome(str(slide), str(slide), "failed", time.perf_counter() - start, text)
        values = {"probability": outcome.probability, "evaluation": outcome}
        return TaskOutcome(
            str(slide), str(slide), "written", time.perf_counter() - start, "", values
        )


@dataclass(frozen=True)
class EmbedTask:
    """Embed one bag file into ``<out_dir>/<bag name>`` (``embed --scheduler/--workers``).

    The "slide" of this task is the bag file's path. Each worker process builds the encoder
    once (from its name and weights file, which must be at the same path on every worker).

    Parameters
    ----------
    out_dir : str
        Folder of the bag files with features (the bags' own folder: in place).
    encoder : str
        Encoder name (:func:`napari_magnet.bags.encoders.build_encoder`).
    weights : str or None
        Its weights file.
    device : str
        ``"auto"`` (a GPU per worker when present), ``"cpu"``, ``"cuda"``.
    batch_size : int
        Patches per forward pass.
    dtype : str
        ``"float16"`` or ``"float32"``.
    slides_dir : str or None
        Where the slides are looked for first.
    seed : int
        Initialisation seed of an encoder without weights.
    overwrite : bool
        Embed again bags that hold features of this configuration.
    """

    out_dir: str
    encoder: str
    weights: str | None = None
    device: str = "auto"
    batch_size: int = 64
    dtype: str = "float16"
    slides_dir: str | None = None
    seed: int = 0
    overwrite: bool = False
    gpu: bool = True

    def _encoder(self) -> Any:
        import warnings

        from ..bags.encoders import RandomFeaturesWarning, build_encoder

        device = worker_device(self.device)
        key = (self.encoder, self.weights, device, self.seed)
        if key not in _ENCODERS:
            with warnings.catch_warnings():  # the caller warned once already
                warnings.simplefilter("ignore", RandomFeaturesWarning)
                _ENCODERS[key] = build_encoder(
                    self.encoder, self.weights, device=device, seed=self.seed
                )
        return _ENCODERS[key]

    def output_for(self, slide: str) -> Path:
        """``<out_dir>/<bag name>``."""
        return Path(self.out_dir) / Path(slide).name

    def done(self, slide: str) -> bool:
        """The output holds features of this encoder configuration for the same grids."""
        from ..bags.embedding import has_features_of

        if self.overwrite:
            return False
        config_hash = self._encoder().config_hash(dtype=self.dtype)
        return has_features_of(Path(slide), self.output_for(slide), config_hash)

    def recorded(self, slide: str) -> dict[str, Any]:
        """Nothing beyond the file itself."""
        return {}

    def run(self, slide: str) -> TaskOutcome:
        """:func:`~napari_magnet.bags.embedding.embed_bag` (which returns failures) as a
        :class:`TaskOutcome`; first removes what a dead attempt may have left."""
        from ..bags.embedding import embed_bag

        output = self.output_for(slide)
        for stale in output.parent.glob(f".{output.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        encoder = self._encoder()
        o = embed_bag(
            slide,
            encoder,
            batch_size=self.batch_size,
            output=output,
            slides_dir=self.slides_dir,
            dtype=self.dtype,
            overwrite=self.overwrite,
        )
        return TaskOutcome(
            str(slide), str(o.output), o.status, o.seconds, o.reason, {"patches": o.patches}
        )
