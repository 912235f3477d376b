"""``napari-small``: a small CNN patch encoder trained on the project's synthetic slides.

Four stages, each a stride-2 convolution and a stride-1 convolution (3×3, batch norm, ReLU),
16 → 32 → 64 → 128 channels, then global average pooling: 128-d features, about 0.3 M
parameters, about 14 M multiply-adds for a 64-px patch. Designed for 64-px patches at 1 to 8
µm per pixel; any input side of at least 32 pixels works (the pooling is global).

The weights shipped in ``napari_magnet/weights/encoder-small.safetensors`` come from
:mod:`.train_encoder` (its provenance is in ``encoder-small.json`` beside them): the network
was trained, with a linear head that is not kept, to tell lesion, normal tissue and glass
apart on patches of synthetic slides. They know nothing of real tissue. Imports no napari.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "FEATURE_DIM",
    "SHIPPED_JSON",
    "SHIPPED_WEIGHTS",
    "SMALL_MEAN",
    "SMALL_STD",
    "SMALL_WIDTHS",
    "SmallEncoder",
    "shipped_weights",
]

#: Channels of the four stages; the last is the feature length.
SMALL_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
FEATURE_DIM = SMALL_WIDTHS[-1]
#: Normalisation of the input (in [0, 1] units): centred on a typical stained-slide pixel.
SMALL_MEAN = (0.5, 0.5, 0.5)
SMALL_STD = (0.25, 0.25, 0.25)

SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "encoder-small.safetensors"
SHIPPED_JSON = SHIPPED_WEIGHTS.with_suffix(".json")


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class SmallEncoder(nn.Module):
    """Small CNN: four (stride-2 conv, conv) stages and global average pooling.

    Parameters
    ----------
    widths : tuple of int
        Output channels of each stage; the last is the feature length.

    Notes
    -----
    The input is a normalised float batch ``(B, 3, H, W)`` with ``H, W >= 32`` (the
    registry's wrapper turns uint8 patches into it); the output is ``(B, widths[-1])``.
    """

    def __init__(self, widths: tuple[int, ...] = SMALL_WIDTHS) -> None:
        super().__init__()
        stages = []
        c_in = 3
        for c_out in widths:
            stages.append(
                nn.Sequential(_conv_bn_relu(c_in, c_out, 2), _conv_bn_relu(c_out, c_out, 1))
            )
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dim = int(widths[-1])
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if min(x.shape[-2:]) < 32:
            raise ValueError(f"napari-small needs patches of at least 32 px, got {tuple(x.shape)}")
        return torch.flatten(self.pool(self.stages(x)), 1)


def shipped_weights() -> Path | None:
    """The shipped weights file, or ``None`` when the installation lacks it."""
    return SHIPPED_WEIGHTS if SHIPPED_WEIGHTS.is_file() else None
