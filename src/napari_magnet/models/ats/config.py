"""Attention sampling's configuration: :class:`ATSConfig` and the named configs (DESIGN §5)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

__all__ = ["ATS_CONFIGS", "ATSConfig", "ats_config"]


@dataclass(frozen=True)
class ATSConfig:
    """Hyper-parameters of an attention-sampling model (frozen, hashable, JSON-able).

    Attributes
    ----------
    name : str
        Registry name (``"ats"``, ``"ats-p50-n20"``, …).
    view_size : int
        Longer side, in pixels, of the downscaled view fed to the attention network (256: the
        attention map then has up to 65,536 positions and costs ~0.2 MB of RGB).
    patch_size : int
        Side ``P`` of each high-resolution patch, in patch pixels (50 in the talk).
    n_patches : int
        Number of sampled positions ``N`` (20 in the talk).
    replace : bool
        Sample with replacement (categorical) or without (Gumbel-top-k, sampling order).
    epsilon : float
        Mixing weight of the uniform distribution: ``a = (1 − ε) softmax + ε / K``; 0 disables.
    n_classes : int
        Number of output classes.
    feature_dim : int
        Size of the L2-normalised patch feature.
    patch_level_scale : float
        Level-0 pixels per patch pixel (a downsample factor relative to level 0): patches are read
        at this scale, so a patch covers ``patch_size * patch_level_scale`` level-0 pixels.
    two_level : bool
        Sample twice: ``n_regions`` regions from the view's attention, then, inside each region
        (read at ``region_size`` pixels), attention again and ``n_patches`` patches *per region*.
        The slide feature is the nested expectation (regions' features are themselves
        estimates; see :meth:`AttentionSampling.classify_two_level`).
    n_regions : int
        Two-level only: regions ``N1`` drawn from the view's attention.
    region_size : int
        Two-level only: side, in pixels, of each region as the second attention network sees it.
    region_level_scale : float
        Two-level only: level-0 pixels per region pixel; a region covers
        ``region_size * region_level_scale`` level-0 pixels and must contain a whole patch.
    """

    name: str = "ats"
    view_size: int = 256
    patch_size: int = 50
    n_patches: int = 20
    replace: bool = False
    epsilon: float = 0.0
    n_classes: int = 2
    feature_dim: int = 32
    patch_level_scale: float = 4.0
    two_level: bool = False
    n_regions: int = 5
    region_size: int = 64
    region_level_scale: float = 16.0

    #: Fields that exist only for the two-level variant; left out of a one-level config's dict
    #: so that one-level configs (and their checkpoints' hashes) do not depend on them.
    TWO_LEVEL_FIELDS: ClassVar[tuple[str, ...]] = ("n_regions", "region_size", "region_level_scale")

    def __post_init__(self) -> None:
        if self.view_size < 1 or self.patch_size < 1 or self.n_patches < 1:
            raise ValueError("view_size, patch_size and n_patches must be positive")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        if self.n_classes < 1 or self.feature_dim < 1:
            raise ValueError("n_classes and feature_dim must be positive")
        if not self.patch_level_scale > 0:
            raise ValueError("patch_level_scale must be positive")
        if self.two_level:
            if self.n_regions < 1 or self.region_size < 1:
                raise ValueError("n_regions and region_size must be positive")
            if not self.region_level_scale > 0:
                raise ValueError("region_level_scale must be positive")
            if self.patch_side > self.region_side:
                raise ValueError(
                    f"a patch ({self.patch_side:g} level-0 px) must fit inside its region "
                    f"({self.region_side:g} level-0 px): raise region_size or region_level_scale"
                )

    @property
    def patch_side(self) -> float:
        """Level-0 pixels one patch covers."""
        return self.patch_size * self.patch_level_scale

    @property
    def region_side(self) -> float:
        """Level-0 pixels one two-level region covers."""
        return self.region_size * self.region_level_scale

    @property
    def total_patches(self) -> int:
        """Patches the feature network sees per slide (``n_regions * n_patches`` if two-level)."""
        return self.n_patches * (self.n_regions if self.two_level else 1)

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict of the fields (one-level: without the two-level ones)."""
        d = asdict(self)
        if not self.two_level:
            for key in self.TWO_LEVEL_FIELDS:
                d.pop(key)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ATSConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ATSConfig keys: {sorted(unknown)}")
        return cls(**d)

    def canonical_json(self) -> str:
        """Sorted, compact, ASCII JSON of :meth:`to_dict` (what :meth:`config_hash` hashes)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def config_hash(self) -> str:
        """SHA-256 hex digest of :meth:`canonical_json` (the checkpoints' ``config_hash``)."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


def ats_config(patch_size: int, n_patches: int, name: str | None = None, **kw) -> ATSConfig:
    """An :class:`ATSConfig` named ``ats-p{P}-n{N}`` unless ``name`` is given.

    Parameters
    ----------
    patch_size, n_patches : int
        ``P`` and ``N``.
    name : str, optional
        Registry name.
    **kw
        Further :class:`ATSConfig` fields.

    Returns
    -------
    ATSConfig
    """
    return ATSConfig(
        name=name or f"ats-p{patch_size}-n{n_patches}",
        patch_size=patch_size,
        n_patches=n_patches,
        **kw,
    )


#: Named configurations for the registry: ``"ats"`` (patch 50, 20 patches), the talk's grid and
#: ``"ats-2level"`` (5 regions of 1024 level-0 px, 4 patches of 50 px in each: 20 patches).
ATS_CONFIGS: dict[str, Callable[[], ATSConfig]] = {
    "ats": lambda: ats_config(50, 20, name="ats"),
    "ats-2level": lambda: ats_config(
        50,
        4,
        name="ats-2level",
        two_level=True,
        n_regions=5,
        region_size=64,
        region_level_scale=16.0,
    ),
    "ats-p50-n1": lambda: ats_config(50, 1),
    "ats-p50-n5": lambda: ats_config(50, 5),
    "ats-p50-n20": lambda: ats_config(50, 20),
    "ats-p20-n5": lambda: ats_config(20, 5),
}
