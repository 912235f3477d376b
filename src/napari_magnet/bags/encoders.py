"""Patch encoders for feature bags: a registry of names → builders (DESIGN §9-10).

* ``resnet50-trunc``: torchvision's ResNet-50 truncated after ``layer3`` and globally
  average-pooled → 1024-d (the CLAM / ZoomMIL standard); a full ResNet-50 state dict loads
  into it (``layer4`` and ``fc`` are ignored).
* ``torchvision:<name>``: any torchvision classification model, its head replaced by the
  identity (``torchvision.models.get_model(name, weights=None)``).
* ``timm:<name>``: any timm model with ``num_classes=0`` (pooled features), when timm is
  installed (an optional dependency).
* ``napari-small``: a small CNN (:mod:`.small_encoder`) trained on the project's synthetic
  slides → 128-d; its weights ship with the package and load when no file is given.

Nothing is ever downloaded: weights come from a file the user gives (safetensors, or a torch
state dict read with ``weights_only=True``) or, for an encoder registered with
``default_weights``, from the file shipped with the package. Without either the model is
initialised under a fixed seed (two builds give identical weights) and a
:class:`RandomFeaturesWarning` says the features are random. Every encoder takes
``(B, 3, H, W)`` uint8 patches and normalises them itself (ImageNet mean and standard
deviation unless the model says otherwise).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .small_encoder import SMALL_MEAN, SMALL_STD, SmallEncoder, shipped_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "EncoderError",
    "RandomFeaturesWarning",
    "build_encoder",
    "known_encoders",
    "load_weights_file",
    "register_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SEED = 0


class EncoderError(ValueError):
    """An encoder name or its weights file cannot be used (the message says why)."""


class RandomFeaturesWarning(UserWarning):
    """An encoder was built without weights: its features are random."""


class Normalised(nn.Module):
    """uint8 (or [0, 1] float) patches → ``(x - mean) / std`` → the wrapped network.

    Parameters
    ----------
    body : nn.Module
        The network; its output is flattened to ``(B, D)``.
    mean, std : tuple of float
        Per-channel statistics, in [0, 1] units.
    """

    def __init__(self, body: nn.Module, mean: tuple, std: tuple) -> None:
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        x = (x - self.mean) / self.std
        return torch.flatten(self.body(x), 1)


class ResNet50Trunc(nn.Module):
    """ResNet-50 up to ``layer3``, then global average pooling: 1024-d features.

    Parameter names are torchvision's, so a full ResNet-50 state dict loads into it (its
    ``layer4.*`` and ``fc.*`` keys are the ignored prefixes).
    """

    ignored_prefixes = ("layer4.", "fc.")

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        full = resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            setattr(self, name, getattr(full, name))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


@dataclass
class Encoder:
    """A built encoder.

    Parameters
    ----------
    name : str
        The registry name it was built from (``"resnet50-trunc"``, ``"timm:vit_small_…"``).
    module : nn.Module
        Takes ``(B, 3, H, W)`` uint8 patches, returns ``(B, dim)`` features; in eval mode.
    dim : int
        Feature length.
    weights : Path or None
        The weights file loaded (``None``: random weights under ``seed``).
    weights_sha256 : str or None
        The weights file's SHA-256.
    seed : int
        Seed of the initialisation.
    config : dict
        What makes the features (name, weights hash, seed, normalisation).
    """

    name: str
    module: nn.Module
    dim: int
    weights: Path | None = None
    weights_sha256: str | None = None
    seed: int = DEFAULT_SEED
    config: dict = field(default_factory=dict)

    def config_hash(self, **extra: Any) -> str:
        """16 hex digits of the SHA-256 of :attr:`config` plus ``extra`` (sorted JSON)."""
        text = json.dumps({**self.config, **extra}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# name → (builder returning (body, mean, std, ignored state-dict prefixes), description)
Builder = Callable[[str], tuple[nn.Module, tuple, tuple, tuple[str, ...]]]
_REGISTRY: dict[str, tuple[Builder, str]] = {}
_PREFIXED: dict[str, tuple[Builder, str]] = {}
# name → the weights file used when none is given (None: not installed)
_DEFAULT_WEIGHTS: dict[str, Callable[[], Path | None]] = {}


def register_encoder(
    name: str,
    builder: Builder,
    description: str,
    prefix: bool = False,
    default_weights: Callable[[], Path | None] | None = None,
) -> None:
    """Register an encoder builder.

    Parameters
    ----------
    name : str
        The name (``"resnet50-trunc"``) or, with ``prefix``, the family prefix (``"timm"``,
        then ``"timm:<model>"`` names reach the builder with ``<model>``).
    builder : callable
        ``builder(model_name) -> (module, mean, std, ignored_prefixes)``; called under a
        fixed seed.
    description : str
        One line for listings.
    prefix : bool
        Register a ``prefix:<name>`` family rather than one name.
    default_weights : callable, optional
        Returns the weights file loaded when :func:`build_encoder` is given none (weights
        shipped with a package), or ``None`` when it is not there.
    """
    (_PREFIXED if prefix else _REGISTRY)[name] = (builder, description)
    if default_weights is not None and not prefix:
        _DEFAULT_WEIGHTS[name] = default_weights


def known_encoders() -> dict[str, str]:
    """Encoder names (``"timm:<name>"`` for families) → descriptions."""
    names = {name: desc for name, (_, desc) in _REGISTRY.items()}
    names.update({f"{p}:<name>": desc for p, (_, desc) in _PREFIXED.items()})
    return names


def _resnet50_trunc(_: str) -> tuple[nn.Module, tuple, tuple, tuple[str, ...]]:
    return ResNet50Trunc(), IMAGENET_MEAN, IMAGENET_STD, ResNet50Trunc.ignored_prefixes


_HEADS = ("fc", "classifier", "heads", "head")


def _torchvision(name: str) -> tuple[nn.Module, tuple, tuple, tuple[str, ...]]:
    import torchvision.models as tvm

    try:
        model = tvm.get_model(name, weights=None)
    except (ValueError, KeyError) as error:
        raise EncoderError(f"torchvision has no model {name!r}: {error}") from error
    for head in _HEADS:
        if isinstance(getattr(model, head, None), nn.Module):
            setattr(model, head, nn.Identity())
            return model, IMAGENET_MEAN, IMAGENET_STD, (f"{head}.",)
    return model, IMAGENET_MEAN, IMAGENET_STD, ()


def _timm(name: str) -> tuple[nn.Module, tuple, tuple, tuple[str, ...]]:
    try:
        import timm
    except ImportError as error:
        raise EncoderError(
            "timm encoders need the optional dependency timm (pip install timm)"
        ) from error
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except (RuntimeError, ValueError, KeyError) as error:
        raise EncoderError(f"timm has no model {name!r}: {error}") from error
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return model, mean, std, ("head.", "fc.", "classifier.")


register_encoder(
    "resnet50-trunc",
    _resnet50_trunc,
    "ResNet-50 after layer3, average-pooled: 1024-d (CLAM / ZoomMIL)",
)


def _napari_small(_: str) -> tuple[nn.Module, tuple, tuple, tuple[str, ...]]:
    return SmallEncoder(), SMALL_MEAN, SMALL_STD, ("head.",)


register_encoder(
    "napari-small",
    _napari_small,
    "small CNN trained on napari-magnet's synthetic slides: 128-d (shipped)",
    default_weights=shipped_weights,
)
register_encoder("torchvision", _torchvision, "a torchvision model, head removed", prefix=True)
register_encoder("timm", _timm, "a timm model, num_classes=0 (needs timm)", prefix=True)


def _lookup(name: str) -> tuple[Builder, str]:
    if name in _REGISTRY:
        return _REGISTRY[name][0], name
    prefix, sep, model = name.partition(":")
    if sep and prefix in _PREFIXED and model:
        return _PREFIXED[prefix][0], model
    raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(known_encoders())}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (read with ``weights_only``).

    A torch checkpoint holding the state dict under ``"state_dict"`` or ``"model"`` is
    unwrapped, and a ``"module."`` prefix (DataParallel) is stripped.

    Raises
    ------
    EncoderError
        The file is missing, unreadable, or holds no tensors by name.
    """
    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"weights file {path} not found")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(os.fspath(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every loader failure means the same here
        raise EncoderError(
            f"{path.name} is not a safetensors file nor a torch state dict: {error}"
        ) from error
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    ):
        raise EncoderError(f"{path.name} holds no state dict (names → tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(body: nn.Module, state: Mapping, ignored: tuple[str, ...], path: Path) -> None:
    own = body.state_dict()
    unexpected = [k for k in state if k not in own and not k.startswith(ignored)]
    missing = [k for k in own if k not in state]
    wrong = [
        f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{' …' * (len(keys) > 3)})")
        raise EncoderError(f"{path.name} does not fit this encoder: " + "; ".join(parts))
    body.load_state_dict({k: state[k] for k in own}, strict=True)


def build_encoder(
    name: str,
    weights: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    seed: int = DEFAULT_SEED,
    probe_size: int = 224,
) -> Encoder:
    """Build an encoder by name, in eval mode on ``device``.

    Parameters
    ----------
    name : str
        ``"resnet50-trunc"``, ``"napari-small"``, ``"torchvision:<name>"`` or
        ``"timm:<name>"``.
    weights : path-like, optional
        A safetensors file or torch state dict for the model (head keys may be present;
        they are ignored). Without it an encoder's shipped weights load (``napari-small``);
        an encoder without any has random features and a :class:`RandomFeaturesWarning` is
        issued.
    device : torch.device or str
        Where the module lives.
    seed : int
        Seed of the initialisation (forked RNG: the caller's state is untouched).
    probe_size : int
        Side of the dummy input that measures the feature length (one forward pass).

    Raises
    ------
    EncoderError
        Unknown name, missing optional dependency, or a weights file that does not fit.
    """
    builder, model_name = _lookup(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        body, mean, std, ignored = builder(model_name)
    if weights is None and name in _DEFAULT_WEIGHTS:
        weights = _DEFAULT_WEIGHTS[name]()
    path = None if weights is None else Path(weights)
    if path is None:
        warnings.warn(
            f"encoder {name!r} has no weights file: its features are random (seed {seed}); "
            "give one with --weights",
            RandomFeaturesWarning,
            stacklevel=2,
        )
    else:
        _load_into(body, load_weights_file(path), tuple(ignored), path)
    module = Normalised(body, tuple(mean), tuple(std)).eval().to(device)
    with torch.inference_mode():
        probe = torch.zeros((1, 3, probe_size, probe_size), dtype=torch.uint8, device=device)
        dim = int(module(probe).shape[1])
    digest = None if path is None else _sha256(path)
    config = {
        "encoder": name,
        "weights_sha256": digest,
        "seed": None if path is not None else int(seed),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "dim": dim,
    }
    return Encoder(name, module, dim, path, digest, int(seed), config)
