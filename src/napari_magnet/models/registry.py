"""Named models and architectures: ``load_model("magnet3")``, ``load_model("run.safetensors")``.

Two small registries:

* **architectures** — ``name -> factory(config_dict) -> nn.Module``: how to rebuild a model from
  the ``config`` stored in a checkpoint's JSON (``"magnet"`` is built in). Register with
  :func:`register_architecture`.
* **configs** — ``name -> factory() -> nn.Module``: named, randomly initialised models
  (``"magnet3"``, ``"magnet4"``, ``"magnet3-lite"`` built in). :func:`load_model` calls the factory
  under a fixed torch seed (in a forked RNG, so the caller's RNG state is untouched), so two
  loads give identical weights. Register with :func:`register_config`.

Other model families (attention sampling) register themselves when their module is imported;
the modules listed in ``_PLUGIN_MODULES`` are imported on the first registry lookup, so
``load_model("ats")`` works without importing them by hand. A model to be saved/loaded exposes
``architecture`` (str) and ``config.to_dict()`` (see :mod:`.checkpoints`).

``"demo"`` is the checkpoint shipped at ``napari_magnet/weights/demo.safetensors`` (+ ``.json``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoints import CheckpointError, load_checkpoint, load_state_into, read_checkpoint
from .magnet import MAGNET_CONFIGS, MagNet, MagNetConfig

__all__ = [
    "DEFAULT_SEED",
    "DEMO_CHECKPOINT",
    "build_architecture",
    "known_architectures",
    "known_models",
    "load_model",
    "register_architecture",
    "register_config",
    "resolve_device",
]

ArchitectureFactory = Callable[[Mapping[str, Any]], nn.Module]
ConfigFactory = Callable[[], nn.Module]

DEFAULT_SEED = 0
DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "demo.safetensors"
_PLUGIN_MODULES = ("napari_magnet.models.ats",)

_ARCHITECTURES: dict[str, ArchitectureFactory] = {}
_CONFIGS: dict[str, ConfigFactory] = {}
_plugins_loaded = False


def register_architecture(name: str, factory: ArchitectureFactory, *,
                          overwrite: bool = False) -> None:
    """Register ``factory(config_dict) -> nn.Module`` for checkpoints of architecture ``name``.

    The factory must raise ``ValueError``/``TypeError`` for a config it cannot build.
    Re-registering a name needs ``overwrite=True`` (the same factory again is a no-op).
    """
    if not name or not isinstance(name, str):
        raise ValueError("architecture name must be a non-empty string")
    if name in _ARCHITECTURES and _ARCHITECTURES[name] is not factory and not overwrite:
        raise ValueError(f"architecture {name!r} is already registered")
    _ARCHITECTURES[name] = factory


def register_config(name: str, factory: ConfigFactory, *, overwrite: bool = False) -> None:
    """Register a named model: ``factory() -> nn.Module`` with random init.

    :func:`load_model` runs the factory under a fixed seed. ``"demo"`` is reserved.
    """
    if not name or not isinstance(name, str):
        raise ValueError("model name must be a non-empty string")
    if name == "demo":
        raise ValueError("'demo' is reserved for the shipped checkpoint")
    if name in _CONFIGS and _CONFIGS[name] is not factory and not overwrite:
        raise ValueError(f"model {name!r} is already registered")
    _CONFIGS[name] = factory


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in _PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # the module exists but one of its imports is missing
                raise


def known_models() -> list[str]:
    """Names :func:`load_model` accepts (besides checkpoint paths)."""
    _load_plugins()
    return sorted(_CONFIGS) + ["demo"]


def known_architectures() -> list[str]:
    """Architecture names checkpoints may declare."""
    _load_plugins()
    return sorted(_ARCHITECTURES)


def build_architecture(name: str, config: Mapping[str, Any]) -> nn.Module:
    """Build an (untrained) model of architecture ``name`` from a config dict.

    Raises ``KeyError`` for an unknown architecture.
    """
    _load_plugins()
    if name not in _ARCHITECTURES:
        raise KeyError(name)
    return _ARCHITECTURES[name](config)


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
            raise ValueError(f"device {device!r} requested but only "
                             f"{torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def _seeded(factory: ConfigFactory, seed: int) -> nn.Module:
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return factory()


def _looks_like_path(s: str) -> bool:
    return (os.sep in s or "/" in s or s.endswith((".safetensors", ".json"))
            or Path(s).exists())


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "auto",
               weights: str | os.PathLike | None = None, *,
               seed: int = DEFAULT_SEED) -> nn.Module:
    """Load a named model or a checkpoint.

    Parameters
    ----------
    name_or_path : str or Path
        A registered name (``"magnet3"``, ``"magnet4"``, ``"magnet3-lite"``, ``"ats"`` …;
        random init under ``seed``), ``"demo"`` (the shipped checkpoint), or a checkpoint path
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
    _load_plugins()
    key = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and key in _CONFIGS:
        model = _seeded(_CONFIGS[key], seed)
        model.model_name = key
        model.checkpoint_sha256 = ""
        if weights is not None:
            ck = load_state_into(model, read_checkpoint(weights))
            model.checkpoint_sha256 = ck.sha256
        return model.to(dev).eval()
    if weights is not None:
        raise ValueError("weights= applies to a named model; a checkpoint path carries its own")
    if isinstance(name_or_path, str) and key == "demo":
        if not DEMO_CHECKPOINT.is_file():
            raise CheckpointError(
                f"{DEMO_CHECKPOINT}: the demo model has not been trained and shipped with "
                f"this installation yet; use 'magnet3-lite' (random weights) or a checkpoint "
                f"path")
        model = load_checkpoint(DEMO_CHECKPOINT, device=dev)
        model.model_name = "demo"
        return model
    if not isinstance(name_or_path, str) or _looks_like_path(key):
        return load_checkpoint(key, device=dev)
    raise ValueError(f"unknown model {key!r}; known models: {', '.join(known_models())}, "
                     f"or a path to a .safetensors/.json checkpoint")


def _magnet_from_dict(config: Mapping[str, Any]) -> nn.Module:
    return MagNet(MagNetConfig.from_dict(config))


register_architecture("magnet", _magnet_from_dict)
for _name, _cfg in MAGNET_CONFIGS.items():
    register_config(_name, (lambda c=_cfg: MagNet(c)))
del _name, _cfg
