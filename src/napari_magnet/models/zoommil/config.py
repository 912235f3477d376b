"""ZoomMIL's configuration: :class:`ZoomMILConfig` and the named configs (DESIGN §9)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

__all__ = ["ZOOMMIL_CONFIGS", "ZoomMILConfig"]


@dataclass(frozen=True)
class ZoomMILConfig:
    """Hyper-parameters of a ZoomMIL model (frozen, hashable, JSON-able).

    A model with one magnification and no zoom step is gated-attention MIL (ABMIL) over that
    magnification's whole bag: the baseline the paper compares with.

    Attributes
    ----------
    name : str
        Registry name (``"zoommil"``, ``"abmil"``).
    mpps : tuple of float
        Target µm per pixel of each magnification, coarsest first; each the previous one
        divided by an integer ``r`` (a patch has ``r²`` children at the next one).
        ``(8, 4, 1)`` ≈ 1.25×, 2.5×, 10×.
    patch_size : int
        Patch side in pixels at every magnification (the bag files' ``patch_size``).
    encoder : str
        Name of the patch encoder in :mod:`napari_magnet.bags.encoders` (its weights are part
        of the model's checkpoint; bag features must come from the same encoder).
    feature_dim : int
        Length of the encoder's features ``D``.
    hidden : int
        Size of each magnification's projection (Linear → ReLU → dropout).
    attention_hidden : int
        Size of the gated attention's hidden layer.
    dropout : float
        Dropout after each projection (training only).
    k : tuple of int
        Patches selected per zoom step (``len(mpps) - 1`` entries); fewer when a bag is smaller.
        The default (12, 2): the public code's K = 12 at the first zoom, then 2, so that a
        slide embeds about 109 patches, under 1/10 of what ABMIL embeds; (6, 4) chose the
        patch holding an isolated tumour cell less often (ITC AUROC 0.956 vs 0.996, seed 0).
    sigma : float
        Standard deviation of the Gaussian noise added to the **unnormalised selection scores**
        (not to softmax outputs, whose scale is ≈ 1/N: the noise level here does not depend on
        the bag's size).
    samples : int
        Noisy copies of the scores averaged by the perturbed top-K in training.
    n_classes : int
        Output classes (2: negative / tumour; the probability reported is the last class's).
    min_tissue : float
        Coarse patches with a smaller tissue fraction are left out of the first bag at
        inference (the same rule as ``napari-magnet patch``).
    encoder_weights : str or None
        SHA-256 of the weights file the encoder was given (``train --encoder-weights``);
        ``None``: the encoder's own default (napari-small's shipped weights). Tells which
        bag features fit the model.
    """

    name: str = "zoommil"
    mpps: tuple[float, ...] = (8.0, 4.0, 1.0)
    patch_size: int = 64
    encoder: str = "napari-small"
    feature_dim: int = 128
    hidden: int = 128
    attention_hidden: int = 64
    dropout: float = 0.25
    k: tuple[int, ...] = (12, 2)
    sigma: float = 0.05
    samples: int = 100
    n_classes: int = 2
    min_tissue: float = 0.05
    encoder_weights: str | None = None

    def __post_init__(self) -> None:
        mpps = tuple(float(m) for m in self.mpps)
        object.__setattr__(self, "mpps", mpps)
        object.__setattr__(self, "k", tuple(int(v) for v in self.k))
        if not mpps or any(not (math.isfinite(m) and m > 0) for m in mpps):
            raise ValueError(f"mpps must be positive µm per pixel values, got {self.mpps}")
        for coarse, fine in zip(mpps, mpps[1:]):
            ratio = coarse / fine
            if ratio < 1.5 or abs(ratio - round(ratio)) > 1e-6:
                raise ValueError(
                    f"each magnification must be the previous one divided by an integer ≥ 2; "
                    f"{coarse:g} → {fine:g} µm per pixel is not"
                )
        if len(self.k) != len(mpps) - 1 or any(v < 1 for v in self.k):
            raise ValueError(
                f"k needs one positive count per zoom step ({len(mpps) - 1}), got {self.k}"
            )
        for key in ("patch_size", "feature_dim", "hidden", "attention_hidden", "samples"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not float(self.sigma) > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        if int(self.n_classes) < 2:
            raise ValueError(f"n_classes must be at least 2, got {self.n_classes}")

    @property
    def steps(self) -> int:
        """Magnifications, i.e. ``MagnifyStep`` records a run yields."""
        return len(self.mpps)

    def fan_out(self, m: int) -> int:
        """Children per side of a magnification-``m`` patch at ``m + 1``."""
        return int(round(self.mpps[m] / self.mpps[m + 1]))

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of the fields."""
        d = asdict(self)
        d["mpps"] = list(self.mpps)
        d["k"] = list(self.k)
        if self.encoder_weights is None:
            d.pop("encoder_weights")  # configs made before the field keep their hash
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ZoomMILConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ZoomMILConfig keys: {sorted(unknown)}")
        d = dict(d)
        for key in ("mpps", "k"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def canonical_json(self) -> str:
        """Sorted, compact, ASCII JSON of :meth:`to_dict` (what :meth:`config_hash` hashes)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def config_hash(self) -> str:
        """SHA-256 hex digest of :meth:`canonical_json` (the checkpoints' ``config_hash``)."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


#: The paper's sizes for real slides: ResNet-50 after layer3 (1024-d; give its weights with
#: ``train --encoder-weights``), 256 px patches, projections of 512, attention of 256, K = 12.
_R50 = {
    "encoder": "resnet50-trunc",
    "feature_dim": 1024,
    "patch_size": 256,
    "hidden": 512,
    "attention_hidden": 256,
}

#: Named configurations: ZoomMIL over 8 → 4 → 1 µm/px, and the ABMIL baseline on the 1 µm/px
#: bag alone — with the shipped napari-small encoder, and with ResNet-50 for real slides.
ZOOMMIL_CONFIGS: dict[str, ZoomMILConfig] = {
    "zoommil": ZoomMILConfig(),
    "abmil": ZoomMILConfig(name="abmil", mpps=(1.0,), k=()),
    "zoommil-r50": ZoomMILConfig(name="zoommil-r50", k=(12, 12), **_R50),
    "abmil-r50": ZoomMILConfig(name="abmil-r50", mpps=(1.0,), k=(), **_R50),
}
