"""The records a bag is made of: :class:`BagLevel` (one magnification) and :class:`Bag`.

One record type for every origin — a grid just built (:mod:`.grid`), one of our bag files
(:mod:`.bagfile`), or CLAM's and TRIDENT's files (:mod:`.foreign`) — so the viewer, an
embedder and a multiple-instance model read them all the same way. Fields a file does not
record are ``None``. Arrays are read-only. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = ["Bag", "BagLevel", "magnification_of", "mpp_of"]


def magnification_of(mpp: float) -> float:
    """The nominal objective magnification of a pixel size (10× ≈ 1 µm per pixel)."""
    return 10.0 / float(mpp)


def mpp_of(magnification: float) -> float:
    """The pixel size, in µm, of a nominal objective magnification (TRIDENT's convention)."""
    return 10.0 / float(magnification)


def _frozen(value: np.ndarray | None, dtype: Any, columns: int | None) -> np.ndarray | None:
    if value is None:
        return None
    array = np.array(value, dtype=dtype, copy=True)
    if columns is None:
        array = array.reshape(-1)
    elif array.size == 0:
        array = array.reshape(0, columns)
    elif array.ndim != 2 or array.shape[1] != columns:
        raise ValueError(f"expected an (N, {columns}) array, got shape {array.shape}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class BagLevel:
    """The patches of one magnification.

    Parameters
    ----------
    name : str
        The HDF5 group the level came from (``"mpp_4"``; ``"/"`` for a one-level file).
    coords : np.ndarray
        ``(N, 2)`` int64 level-0 top-left ``(x, y)`` of each patch.
    extent : (float, float)
        Level-0 ``(width, height)`` a patch covers.
    patch_size : int
        Side, in pixels, of a patch as read (at ``mpp``).
    mpp : float or None
        Target µm per pixel of the patches (``None`` when the file cannot tell).
    patch_level : int or None
        Pyramid level the pixels are read from (the coarsest with enough pixels).
    downsample : (float, float) or None
        Level-0 pixels per patch pixel along ``(x, y)``.
    parent : np.ndarray or None
        ``(N,)`` int64 index of each patch's parent in the previous level, ``-1`` at the
        first level.
    grid : np.ndarray or None
        ``(N, 2)`` int64 ``(column, row)`` of each patch on this magnification's grid.
    tissue : np.ndarray or None
        ``(N,)`` float32 tissue fraction of each patch.
    features : np.ndarray or None
        ``(N, D)`` patch embeddings, when an embedder has added them.
    attrs : mapping
        The ``coords`` dataset's attributes as stored (plus ``features_attrs``).
    """

    name: str
    coords: np.ndarray
    extent: tuple[float, float]
    patch_size: int
    mpp: float | None = None
    patch_level: int | None = None
    downsample: tuple[float, float] | None = None
    parent: np.ndarray | None = None
    grid: np.ndarray | None = None
    tissue: np.ndarray | None = None
    features: np.ndarray | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        coords = _frozen(self.coords, np.int64, 2)
        n = len(coords)
        object.__setattr__(self, "coords", coords)
        object.__setattr__(self, "parent", _frozen(self.parent, np.int64, None))
        object.__setattr__(self, "grid", _frozen(self.grid, np.int64, 2))
        object.__setattr__(self, "tissue", _frozen(self.tissue, np.float32, None))
        if self.features is not None:
            features = np.array(self.features, copy=True)
            features.setflags(write=False)
            object.__setattr__(self, "features", features)
        for key in ("parent", "grid", "tissue", "features"):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ValueError(f"{self.name}: {key} has {len(value)} rows for {n} patches")
        object.__setattr__(self, "extent", (float(self.extent[0]), float(self.extent[1])))
        object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def magnification(self) -> float | None:
        """Nominal objective magnification (10 / mpp), or ``None``."""
        return None if self.mpp is None else magnification_of(self.mpp)

    def boxes(self) -> np.ndarray:
        """``(N, 4)`` float level-0 boxes ``(x0, y0, x1, y1)``."""
        xy = self.coords.astype(np.float64)
        return np.concatenate([xy, xy + np.asarray(self.extent)], axis=1)

    def children_per_parent(self) -> int | None:
        """Patches per parent when every parent has the same number (``None`` otherwise)."""
        if self.parent is None or len(self) == 0 or self.parent[0] < 0:
            return None
        counts = np.bincount(self.parent)
        counts = counts[counts > 0]
        return int(counts[0]) if (counts == counts[0]).all() else None


@dataclass(frozen=True)
class Bag:
    """The patch grids of one slide, coarsest magnification first.

    Parameters
    ----------
    source : str
        ``"napari-magnet"``, ``"clam-patches"``, ``"clam-features"``, ``"trident-patches"``
        or ``"trident-features"``.
    slide_name : str
        The slide's name (its file stem).
    levels : tuple of BagLevel
        One per magnification, coarsest first (one for CLAM's and TRIDENT's files).
    level0_size : (int, int) or None
        The slide's level-0 ``(width, height)``.
    slide_mpp : (float, float) or None
        The slide's µm per level-0 pixel ``(x, y)``.
    path : Path or None
        The file it was read from.
    attrs : mapping
        The file's root attributes.
    """

    source: str
    slide_name: str
    levels: tuple[BagLevel, ...]
    level0_size: tuple[int, int] | None = None
    slide_mpp: tuple[float, float] | None = None
    path: Path | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        object.__setattr__(self, "attrs", MappingProxyType(dict(self.attrs)))

    @property
    def mpps(self) -> tuple[float | None, ...]:
        """Target µm per pixel of each level, coarsest first."""
        return tuple(level.mpp for level in self.levels)

    def level(self, mpp: float) -> BagLevel:
        """The level whose target pixel size is ``mpp`` (to 0.1 %)."""
        for level in self.levels:
            if level.mpp is not None and abs(level.mpp - mpp) <= 1e-3 * mpp:
                return level
        raise KeyError(f"{self.slide_name}: no level at {mpp} µm per pixel; has {self.mpps}")
