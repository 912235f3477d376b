"""Image backbones for MagNet's classification layer and auxiliary heads.

Three backbones, all built from scratch (``weights=None``) and never downloaded:

``"inception_v3"``
    torchvision's InceptionV3 (no auxiliary logits, ``init_weights=True``), ``fc`` removed:
    ``(N, 3, H, W) -> (N, 2048)``. Needs ``H, W >= 75``; MagNet feeds 224.
``"resnet18"``
    torchvision's ResNet-18, ``fc`` removed: ``(N, 3, H, W) -> (N, 512)``.
``"small"``
    Four conv 3×3 (stride 2) + BatchNorm + ReLU blocks and a global average pool,
    ``(N, 3, H, W) -> (N, widths[-1])``: a few tens of thousands of parameters, fast on CPU.

Every backbone takes images as floats in ``[0, 1]`` and applies the ImageNet mean/std
normalisation itself (a non-persistent buffer, so it does not appear in checkpoints), so that
ImageNet weights, when given, see what they were trained on.

ImageNet weights can be loaded from a local file (``weights=``): a ``.safetensors`` file, or a
torch state dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``
(which refuses arbitrary pickled objects). Keys of the ImageNet classifier (``fc.*``) and of
InceptionV3's auxiliary classifier (``AuxLogits.*``) are ignored; any other missing or unexpected
key is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "BACKBONES",
    "FeatureBackbone",
    "SmallCNN",
    "build_backbone",
    "load_imagenet_weights",
]

BACKBONES = ("inception_v3", "resnet18", "small")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")


class SmallCNN(nn.Module):
    """A small CNN trunk: ``len(widths)`` × (conv 3×3 stride 2, BatchNorm, ReLU), global avg pool.

    Parameters
    ----------
    widths : sequence of int
        Output channels of each block; the feature dimension is ``widths[-1]``.
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [
                nn.Conv2d(cin, int(w), kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(int(w)),
                nn.ReLU(inplace=True),
            ]
            cin = int(w)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.flatten(self.pool(self.features(x)), 1)


class FeatureBackbone(nn.Module):
    """ImageNet normalisation followed by a trunk that returns one feature vector per image.

    Attributes
    ----------
    name : str
        Backbone name (one of :data:`BACKBONES`).
    out_features : int
        Feature dimension.
    trunk : nn.Module
        The wrapped network (``fc`` replaced by ``nn.Identity`` for torchvision models).
    """

    def __init__(self, name: str, trunk: nn.Module, out_features: int) -> None:
        super().__init__()
        self.name = name
        self.out_features = int(out_features)
        self.trunk = trunk
        self.register_buffer(
            "mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` floats in ``[0, 1]`` -> ``(N, out_features)``."""
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = self.trunk(x)
        if not isinstance(out, torch.Tensor):  # InceptionOutputs (not produced: no aux logits)
            out = out[0]
        return out


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling objects."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(16)
    looks_safetensors = len(head) > 8 and head[8:9] == b"{"
    if path.suffix == ".safetensors" or looks_safetensors:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary objects
        raise ValueError(f"cannot read backbone weights from {path}: {exc}") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return sd


def load_imagenet_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load ImageNet weights from a local file into a torchvision trunk (``fc`` removed).

    Parameters
    ----------
    trunk : nn.Module
        The torchvision model whose ``fc`` was replaced by ``nn.Identity``.
    path : str or Path
        ``.safetensors`` or torch state-dict file; ``module.`` prefixes (DataParallel) are
        stripped; ``fc.*`` and ``AuxLogits.*`` keys are ignored.

    Raises
    ------
    ValueError
        When keys are missing/unexpected or shapes differ.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(_IGNORED_PREFIXES)}
    own = trunk.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:10]}{' …' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(
                "shape mismatches "
                + ", ".join(
                    f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:10]
                )
            )
        raise ValueError(f"backbone weights {path} do not fit: " + "; ".join(parts))
    trunk.load_state_dict(sd, strict=True)


def build_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    small_widths: Sequence[int] = (16, 32, 64, 64),
) -> FeatureBackbone:
    """Build a feature backbone by name.

    Parameters
    ----------
    name : {"inception_v3", "resnet18", "small"}
        Which backbone.
    weights : str or Path, optional
        Local ImageNet weights for the torchvision backbones (never downloaded). Not
        supported for ``"small"``.
    small_widths : sequence of int
        Block widths of the ``"small"`` backbone.

    Returns
    -------
    FeatureBackbone
        ``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, out_features)``.
    """
    if name == "inception_v3":
        from torchvision.models import inception_v3

        trunk = inception_v3(weights=None, aux_logits=False, init_weights=True)
        trunk.fc = nn.Identity()
        dim = 2048
    elif name == "resnet18":
        from torchvision.models import resnet18

        trunk = resnet18(weights=None)
        trunk.fc = nn.Identity()
        dim = 512
    elif name == "small":
        if weights is not None:
            raise ValueError("the 'small' backbone has no ImageNet weights")
        trunk = SmallCNN(small_widths)
        dim = trunk.out_features
    else:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    if weights is not None:
        load_imagenet_weights(trunk, weights)
    return FeatureBackbone(name, trunk, dim)
