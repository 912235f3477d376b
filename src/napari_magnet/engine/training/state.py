"""The training state: what a run saves after every epoch to be resumed exactly.

``train_state/epoch-NNNN.safetensors`` holds the tensors (the model's under ``model.``, the
optimizers' under flattened ``optim.<name>.<param id>.<key>`` keys) and ``train_state.json``
everything else (schedule, scaler, epoch, best metric, history, the family task's extra
state, options, split) with the tensors' sha256. Nothing is pickled. The tensors file is on
disk before ``train_state.json`` is atomically replaced: that replacement is the commit
point of an epoch, so an interruption at any moment leaves the last completed epoch
resumable.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch

from ...io.atomic import atomic_path, atomic_write_text
from .options import TrainOptions
from .schedule import CosineSchedule

__all__ = [
    "STATE_DIR",
    "STATE_FORMAT",
    "STATE_JSON",
    "load_training_state",
    "restore_state",
    "save_state",
    "state_json_path",
]

STATE_FORMAT = "napari-magnet-training-state/1"
STATE_JSON = "train_state.json"
STATE_DIR = "train_state"


def _optimizer_tensors(
    name: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Move ``opt``'s tensor state into ``tensors``; the rest, JSON-ready, is returned."""
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
    """The optimizer ``state_dict`` that :func:`_optimizer_tensors` took apart."""
    state: dict[int, dict[str, Any]] = {}
    for pid, keys in meta["tensor_keys"].items():
        state.setdefault(int(pid), {}).update({k: tensors[f"optim.{name}.{pid}.{k}"] for k in keys})
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_state(
    out: Path,
    model,
    task,
    schedule: CosineSchedule,
    scaler,
    epoch: int,
    best: dict[str, Any],
    history: list[dict],
    options: TrainOptions,
    split: dict[str, list[str]],
) -> Path:
    """Save the training state after ``epoch`` (the commit point of the epoch).

    Parameters
    ----------
    out : Path
        The run folder.
    model : nn.Module
        The model (``architecture``, ``config``, ``model_name``).
    task : TrainingTask
        The family's task: its ``optimizers`` and ``extra_state()``.
    schedule : CosineSchedule
        The learning-rate schedule.
    scaler : torch.amp.GradScaler
        Saved when enabled.
    epoch : int
        The epoch just completed.
    best : dict
        The best epoch and its metrics.
    history : list of dict
        One row per epoch.
    options : TrainOptions
        The run's options (recorded).
    split : dict
        ``{"train": [paths], "val": [paths]}``.

    Returns
    -------
    Path
        ``out / train_state.json``.
    """
    from safetensors.torch import save_file

    from ...models.checkpoints import config_hash_of, sha256_of

    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
    }
    optimizers = {
        name: _optimizer_tensors(name, opt, tensors) for name, opt in task.optimizers.items()
    }
    name = f"epoch-{epoch:04d}.safetensors"
    target = state_dir / name
    with atomic_path(target) as tmp:  # on disk (fsynced, renamed) before the JSON below
        save_file(tensors, str(tmp), metadata={"format": STATE_FORMAT, "epoch": str(epoch)})
    config = model.config.to_dict()
    meta = {
        "format": STATE_FORMAT,
        "epoch": int(epoch),
        "model": {
            "architecture": model.architecture,
            "name": getattr(model, "model_name", ""),
            "config": config,
            "config_hash": config_hash_of(config),
        },
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
    # Plain json.dumps, not atomic_write_json: a NaN of the history (no validation) must come
    # back as NaN on resume, not as the None json_safe would make of it.
    atomic_write_text(out / STATE_JSON, json.dumps(meta, indent=1) + "\n")
    for pattern in ("epoch-*.safetensors*", ".epoch-*.safetensors.*.tmp"):
        for old in state_dir.glob(pattern):
            if old.name != name:
                old.unlink(missing_ok=True)
    return out / STATE_JSON


def state_json_path(path: Path) -> Path | None:
    """The ``train_state.json`` that ``path`` names, if any.

    Parameters
    ----------
    path : Path
        A run folder, or the file itself.

    Returns
    -------
    Path or None
        ``None`` when ``path`` is neither (e.g. a model checkpoint).
    """
    if path.is_dir():
        return path / STATE_JSON if (path / STATE_JSON).is_file() else None
    if path.name == STATE_JSON and path.is_file():
        return path
    return None


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a training state (``train_state.json`` or its run folder).

    Parameters
    ----------
    path : path
        The run folder or its ``train_state.json``.

    Returns
    -------
    meta : dict
        The contents of ``train_state.json``.
    tensors : dict of str to torch.Tensor
        The model's and optimizers' tensors.

    Raises
    ------
    CheckpointError
        Missing or corrupt files, a tensors file that does not match its sha256, a pickle.
    """
    from safetensors.torch import load_file

    from ...models.checkpoints import CheckpointError, sha256_of

    p = Path(path)
    state_json = state_json_path(p)
    if state_json is None:
        raise CheckpointError(
            f"{p}: no training state here (expected a run folder holding "
            f"{STATE_JSON}, or that file)"
        )
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
        raise CheckpointError(
            f"{tensors_path}: sha256 differs from {state_json.name} (modified or from another run)"
        )
    try:
        tensors = load_file(str(tensors_path))
    except Exception as exc:  # noqa: BLE001 - safetensors' own errors
        raise CheckpointError(f"{tensors_path}: corrupt safetensors file ({exc})") from None
    return meta, tensors


def restore_state(
    meta: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    task,
    schedule: CosineSchedule,
    scaler,
    total_steps: int,
    where: Any,
) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Put a loaded state's optimizers, schedule, scaler and task state back.

    Parameters
    ----------
    meta, tensors
        What :func:`load_training_state` returned.
    task : TrainingTask
        The new run's task; each of its optimizers must be in the state.
    schedule : CosineSchedule
        Restored, then stretched to ``total_steps``.
    scaler : torch.amp.GradScaler
        Restored when both it and the saved one are enabled.
    total_steps : int
        Steps of the whole (possibly extended) run.
    where : path
        Named in error messages.

    Returns
    -------
    history : list of dict
        The completed epochs' rows.
    best : dict
        The best epoch so far and its metrics.
    first_epoch : int
        The epoch to run next.

    Raises
    ------
    CheckpointError
        An optimizer of the task is missing from the state.
    """
    from ...models.checkpoints import CheckpointError

    for name, opt in task.optimizers.items():
        if name not in meta["optimizers"]:
            raise CheckpointError(
                f"{where}: optimizer {name!r} missing from the "
                f"state (trained with another learning mode?)"
            )
        opt.load_state_dict(_optimizer_from(name, meta["optimizers"][name], tensors))
    schedule.load_state_dict(meta["schedule"])
    schedule.set_total_steps(total_steps)
    if meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    task.load_extra_state(meta.get("task", {}))
    history = [dict(r) for r in meta["history"]]
    best = dict(meta.get("best") or {})
    return history, best, int(meta["epoch"]) + 1
