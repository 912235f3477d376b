"""MagNet's configuration: :class:`MagNetConfig` and the named configs (DESIGN §4)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch

from ..backbones import BACKBONES

__all__ = ["MAGNET_CONFIGS", "MagNetConfig"]


# The largest |t| the tanh squashing can produce is tanh(1) (expected coordinates lie in
# [-1, 1]); the inside-the-image bound s <= 1 - max|t| is therefore never below this.
_MIN_UPPER_SCALE = 1.0 - float(torch.tanh(torch.tensor(1.0)))


# ----------------------------------------------------------------------------- config


def _int_tuple(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


@dataclass(frozen=True)
class MagNetConfig:
    """Architecture of a MagNet (everything that determines its parameters and outputs).

    Attributes
    ----------
    name : str
        Config name (``"magnet3"``, ``"magnet4"``, ``"magnet3-lite"`` or a user's).
    patches_per_layer : tuple of int
        ``P_l`` for each magnifying layer; ``L = len(patches_per_layer)``.
    input_size : int
        Side of every layer input ``I`` and of the attention maps (56).
    final_size : int
        Side of the last layer's output patches, fed to the classifier (224).
    hi_factor : int
        ``I'`` is ``hi_factor`` × the layer's output size (2: 112 for 56, 448 for 224).
    classifier_backbone : str
        ``"inception_v3"`` or ``"small"`` (see :mod:`.backbones`).
    aux_backbone : str
        ``"resnet18"`` or ``"small"``.
    aux_layers : tuple of int
        The two layers whose patches feed the auxiliary heads, ``(1, 3)``; the paradoxical
        loss asks the second not to predict worse than the first.
    frozen_layers : tuple of int
        Layers whose first patch uses ``θ = identity`` (no branch stack), ``(2,)``.
    branch_features : tuple of int
        Output features of the three Branches (each divisible by 5, one fifth per path).
    grey_threshold : float
        Grey filter threshold on the 0–255 scale (15).
    align_corners : bool
        Normalized-coordinate convention for ``affine_grid``/sampling and the map grid.
    min_scale : float
        Lower bound of ``s`` (0.05).
    gru_hidden : int
        Hidden size of the GRU over the final patches.
    head_dims : tuple of int
        Hidden widths of the MLP after the GRU (512, 256), then one logit.
    small_widths : tuple of int
        Block widths of the ``"small"`` backbones (ignored by the torchvision ones).
    linearized_sampler : bool
        Linearized multi-sampling (True) or plain bilinear gradients.
    """

    architecture: ClassVar[str] = "magnet"

    name: str = "magnet3"
    patches_per_layer: tuple[int, ...] = (3, 2, 3)
    input_size: int = 56
    final_size: int = 224
    hi_factor: int = 2
    classifier_backbone: str = "inception_v3"
    aux_backbone: str = "resnet18"
    aux_layers: tuple[int, ...] = (1, 3)
    frozen_layers: tuple[int, ...] = (2,)
    branch_features: tuple[int, ...] = (15, 40, 5)
    grey_threshold: float = 15.0
    align_corners: bool = False
    min_scale: float = 0.05
    gru_hidden: int = 512
    head_dims: tuple[int, ...] = (512, 256)
    small_widths: tuple[int, ...] = (16, 32, 64, 64)
    linearized_sampler: bool = True

    def __post_init__(self) -> None:
        # Canonicalise types so that the hash does not depend on list-vs-tuple or 15 vs 15.0.
        set_ = object.__setattr__
        set_(self, "name", str(self.name))
        for f in (
            "patches_per_layer",
            "aux_layers",
            "frozen_layers",
            "branch_features",
            "head_dims",
            "small_widths",
        ):
            set_(self, f, _int_tuple(getattr(self, f)))
        for f in ("input_size", "final_size", "hi_factor", "gru_hidden"):
            set_(self, f, int(getattr(self, f)))
        for f in ("grey_threshold", "min_scale"):
            set_(self, f, float(getattr(self, f)))
        for f in ("align_corners", "linearized_sampler"):
            set_(self, f, bool(getattr(self, f)))
        self._validate()

    def _validate(self) -> None:
        L = len(self.patches_per_layer)
        if L < 1 or any(p < 1 for p in self.patches_per_layer):
            raise ValueError(f"patches_per_layer must be >= 1 each, got {self.patches_per_layer}")
        if self.classifier_backbone not in ("inception_v3", "small"):
            raise ValueError(
                f"classifier_backbone must be 'inception_v3' or 'small', "
                f"got {self.classifier_backbone!r}"
            )
        if self.aux_backbone not in BACKBONES:
            raise ValueError(f"aux_backbone must be one of {BACKBONES}, got {self.aux_backbone!r}")
        if len(self.aux_layers) != 2 or any(not 1 <= a <= L for a in self.aux_layers):
            raise ValueError(f"aux_layers must be two layers in 1..{L}, got {self.aux_layers}")
        if any(not 1 <= f <= L for f in self.frozen_layers):
            raise ValueError(f"frozen_layers must lie in 1..{L}, got {self.frozen_layers}")
        if len(self.branch_features) != 3 or any(f < 5 or f % 5 for f in self.branch_features):
            raise ValueError(
                f"branch_features must be three multiples of 5, got {self.branch_features}"
            )
        if self.input_size < 4 or self.final_size < 4 or self.hi_factor < 1:
            raise ValueError("input_size, final_size must be >= 4 and hi_factor >= 1")
        if self.classifier_backbone == "inception_v3" and self.final_size < 75:
            raise ValueError("InceptionV3 needs final_size >= 75")
        if not 0.0 < self.min_scale <= _MIN_UPPER_SCALE:
            raise ValueError(
                f"min_scale must lie in (0, {_MIN_UPPER_SCALE:.4f}], got {self.min_scale}"
            )
        if not 0.0 <= self.grey_threshold <= 255.0:
            raise ValueError(f"grey_threshold is on the 0-255 scale, got {self.grey_threshold}")

    # -- derived
    @property
    def num_layers(self) -> int:
        """Number of magnifying layers ``L``."""
        return len(self.patches_per_layer)

    @property
    def inputs_per_layer(self) -> tuple[int, ...]:
        """``N_l`` for each layer: ``N_1 = 1``, ``N_{l+1} = N_l · P_l``."""
        n, out = 1, []
        for p in self.patches_per_layer:
            out.append(n)
            n *= p
        return tuple(out)

    def learned_patches(self, layer: int) -> tuple[int, ...]:
        """Indices of the patches of ``layer`` (1-based) that have a branch stack."""
        P = self.patches_per_layer[layer - 1]
        start = 1 if layer in self.frozen_layers else 0
        return tuple(range(start, P))

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MagNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MagNetConfig keys: {unknown}")
        return cls(**dict(d))

    def canonical_json(self) -> str:
        """Sorted, compact JSON of :meth:`to_dict` (what :meth:`config_hash` hashes)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def config_hash(self) -> str:
        """sha256 hex digest of :meth:`canonical_json`."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


MAGNET_CONFIGS: dict[str, MagNetConfig] = {
    "magnet3": MagNetConfig(name="magnet3", patches_per_layer=(3, 2, 3)),
    "magnet4": MagNetConfig(name="magnet4", patches_per_layer=(3, 2, 3, 2)),
    "magnet3-lite": MagNetConfig(
        name="magnet3-lite",
        patches_per_layer=(3, 2, 3),
        classifier_backbone="small",
        aux_backbone="small",
        gru_hidden=64,
        head_dims=(128, 64),
        small_widths=(16, 32, 48, 64),
    ),
}
