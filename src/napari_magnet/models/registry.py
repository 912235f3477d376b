"""Named models and checkpoints: ``load_model("magnet3")``, ``load_model("run.safetensors")``.

What a name or a checkpoint's ``architecture`` means is the business of the model families
(:mod:`napari_magnet.models.family`): each registers its architecture, its config builder and
its named configurations (``"magnet3"``, ``"ats-p50-n5"`` …). :func:`load_model` runs a named
configuration's factory under a fixed torch seed (in a forked RNG, so the caller's RNG state
is untouched), so two loads give identical weights. A model to be saved/loaded exposes
``architecture`` (str) and ``config.to_dict()`` (see :mod:`.checkpoints`).

The shipped checkpoints (:data:`SHIPPED`) load by name: ``"demo"`` (MagNet) and
``"zoommil-demo"`` (ZoomMIL), under ``napari_magnet/weights/`` (``.safetensors`` + ``.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoints import (
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    load_state_into,
    read_checkpoint,
)
from .family import Family, families, get_family, named_config

__all__ = [
    "DEFAULT_SEED",
    "DEMO_CHECKPOINT",
    "SHIPPED",
    "build_architecture",
    "family_of_spec",
    "known_architectures",
    "known_models",
    "listed_models",
    "load_model",
    "resolve_device",
    "shipped_checkpoints",
]

DEFAULT_SEED = 0
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
#: Checkpoints that may ship with the package: name → weights file (the JSON lies beside it).
SHIPPED: dict[str, Path] = {
    "demo": WEIGHTS_DIR / "demo.safetensors",
    "zoommil-demo": WEIGHTS_DIR / "zoommil-demo.safetensors",
}
DEMO_CHECKPOINT = SHIPPED["demo"]


def shipped_checkpoints() -> dict[str, Path]:
    """The shipped checkpoints present in this installation, name → weights file."""
    return {name: path for name, path in SHIPPED.items() if path.is_file()}


def known_models() -> list[str]:
    """Names :func:`load_model` accepts (besides checkpoint paths)."""
    return sorted(name for family in families() for name in family.configs) + list(SHIPPED)


def listed_models() -> list[str]:
    """Model names in the order a user is offered them: the shipped checkpoints present
    first, then each family's named configurations in family order."""
    names = [name for family in families() for name in family.configs]
    return list(shipped_checkpoints()) + names


def known_architectures() -> list[str]:
    """Architecture names checkpoints may declare (one per registered family)."""
    return sorted(family.architecture for family in families())


def build_architecture(name: str, config: Mapping[str, Any]) -> nn.Module:
    """Build an (untrained) model of architecture ``name`` from a config dict.

    Raises ``KeyError`` for an unknown architecture.
    """
    return get_family(name).build(config)


def family_of_spec(spec: str | os.PathLike) -> Family | None:
    """The family of what :func:`load_model` would load for ``spec`` — a registered name,
    ``"demo"`` or a checkpoint path — read from the checkpoint's JSON without loading
    weights; ``None`` when it is unknown or unreadable."""
    key = os.fspath(spec)
    found = named_config(key)
    if found is not None:
        return found[0]
    path = str(SHIPPED[key]) if key in SHIPPED else key
    try:
        meta = json.loads(checkpoint_paths(path)[1].read_text(encoding="utf-8"))
        return get_family(str(meta.get("architecture")))
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return None


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without CUDA is an error."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but only "
                f"{torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dev


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return factory()


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith((".safetensors", ".json")) or Path(s).exists()


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "auto",
    weights: str | os.PathLike | None = None,
    *,
    seed: int = DEFAULT_SEED,
) -> nn.Module:
    """Load a named model or a checkpoint.

    Parameters
    ----------
    name_or_path : str or Path
        A registered name (``"magnet3"``, ``"magnet4"``, ``"magnet3-lite"``, ``"ats"`` …;
        random init under ``seed``), a shipped checkpoint (``"demo"``, ``"zoommil-demo"``), or a
        checkpoint path
        (either file of a ``.safetensors`` + ``.json`` pair).
    device : str or torch.device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.
    weights : str or Path, optional
        A checkpoint to load into the *named* model; its architecture and config must match
        (else :class:`~.checkpoints.CheckpointError` listing the differences).
    seed : int
        Seed of the random initialisation of named models.

    Returns
    -------
    nn.Module
        On ``device``, in eval mode, with ``model_name`` and ``checkpoint_sha256`` ("" for a
        random init).

    Raises
    ------
    ValueError
        Unknown name (the message lists the known ones) or bad device.
    CheckpointError
        Any checkpoint problem, including a ``"demo"`` that has not been shipped.
    """
    dev = resolve_device(device)
    key = os.fspath(name_or_path)
    found = named_config(key) if isinstance(name_or_path, str) else None
    if found is not None:
        model = _seeded(found[1], seed)
        model.model_name = key
        model.checkpoint_sha256 = ""
        if weights is not None:
            ck = load_state_into(model, read_checkpoint(weights))
            model.checkpoint_sha256 = ck.sha256
        return model.to(dev).eval()
    if weights is not None:
        raise ValueError("weights= applies to a named model; a checkpoint path carries its own")
    if isinstance(name_or_path, str) and key in SHIPPED:
        path = SHIPPED[key]
        if not path.is_file():
            raise CheckpointError(
                f"{path}: the {key!r} model has not been trained and shipped with this "
                f"installation yet; use a named model (random weights) or a checkpoint path"
            )
        model = load_checkpoint(path, device=dev)
        model.model_name = key
        return model
    if not isinstance(name_or_path, str) or _looks_like_path(key):
        return load_checkpoint(key, device=dev)
    raise ValueError(
        f"unknown model {key!r}; known models: {', '.join(known_models())}, "
        f"or a path to a .safetensors/.json checkpoint"
    )
