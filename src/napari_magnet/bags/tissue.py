"""Tissue on a slide, from a low-resolution pyramid level, and the tissue fraction of boxes.

The rule is the project's (:func:`napari_magnet.io.coverage.tissue_mask`): a pixel is tissue
unless it is near-white glass (every channel ≥ ``white``), dark padding (every channel ≤
``black``) or a flat grey (channels within ``grey_tolerance`` of each other). It runs on the
smallest pyramid level whose longer side is at least ``mask_side`` pixels; that level is read
in horizontal strips and, when it is still larger than about ``mask_side``, block-averaged by
an integer factor strip by strip, so no whole level of a large slide is ever held in memory.

:meth:`TissueMask.fractions` gives the tissue fraction of level-0 boxes from a summed-area
table; the part of a box outside the slide counts as glass. Imports neither torch nor napari.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..io.coverage import tissue_mask
from ..slide import Slide

__all__ = ["TissueMask", "TissueOptions", "slide_tissue_mask"]

#: Level pixels read at once while building the mask (bounds memory, not the result).
_STRIP_PIXELS = 4_000_000


@dataclass(frozen=True)
class TissueOptions:
    """What counts as tissue, and how much of a patch must be tissue to keep it.

    Parameters
    ----------
    white, black, grey_tolerance : int
        The grey/saturation rule's thresholds (0-255), see
        :func:`napari_magnet.io.coverage.tissue_mask`.
    min_fraction : float
        A patch of the coarsest magnification is kept when it holds some tissue and at
        least this fraction of its area is tissue (0: any tissue at all; 1: only patches
        fully on tissue).
    mask_side : int
        Longer side, in pixels, of the mask the rule runs on (at least 64).
    """

    white: int = 215
    black: int = 40
    grey_tolerance: int = 15
    min_fraction: float = 0.05
    mask_side: int = 1024

    def __post_init__(self) -> None:
        for name in ("white", "black", "grey_tolerance"):
            value = getattr(self, name)
            if not 0 <= int(value) <= 255:
                raise ValueError(f"{name} must be in [0, 255], got {value}")
        if not 0.0 <= float(self.min_fraction) <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {self.min_fraction}")
        if int(self.mask_side) < 64:
            raise ValueError(f"mask_side must be at least 64, got {self.mask_side}")

    def config(self) -> dict[str, float | int]:
        """The options as a plain dict (stored in bag files, compared when resuming)."""
        return {
            "white": int(self.white),
            "black": int(self.black),
            "grey_tolerance": int(self.grey_tolerance),
            "min_fraction": float(self.min_fraction),
            "mask_side": int(self.mask_side),
        }


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over the whole slide.

    Parameters
    ----------
    mask : np.ndarray
        ``(rows, cols)`` bool, True on tissue.
    scale : (float, float)
        Level-0 pixels per mask pixel along ``(x, y)``.
    level : int
        The pyramid level the mask was computed from.
    """

    mask: np.ndarray
    scale: tuple[float, float]
    level: int
    _table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        if mask.ndim != 2:
            raise ValueError(f"a tissue mask is 2-D, got shape {mask.shape}")
        table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
        table[1:, 1:] = mask.cumsum(0).cumsum(1)
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "_table", table)

    @property
    def fraction(self) -> float:
        """Fraction of the slide that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def fractions(self, xy: np.ndarray, size: tuple[float, float]) -> np.ndarray:
        """Tissue fraction of level-0 boxes.

        Parameters
        ----------
        xy : np.ndarray
            ``(N, 2)`` level-0 top-left ``(x, y)`` of the boxes.
        size : (float, float)
            Level-0 ``(width, height)`` shared by all boxes.

        Returns
        -------
        np.ndarray
            ``(N,)`` float32 in [0, 1]: tissue mask pixels inside each box (every mask pixel
            the box touches) over the box's area in mask pixels; the part of a box outside the
            slide counts as glass.
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        sx, sy = self.scale
        rows, cols = self.mask.shape
        c0 = np.floor(xy[:, 0] / sx + 1e-9).astype(np.int64)
        r0 = np.floor(xy[:, 1] / sy + 1e-9).astype(np.int64)
        c1 = np.ceil((xy[:, 0] + size[0]) / sx - 1e-9).astype(np.int64)
        r1 = np.ceil((xy[:, 1] + size[1]) / sy - 1e-9).astype(np.int64)
        area = (np.maximum(c1 - c0, 1) * np.maximum(r1 - r0, 1)).astype(np.float64)
        c0, c1 = np.clip(c0, 0, cols), np.clip(c1, 0, cols)
        r0, r1 = np.clip(r0, 0, rows), np.clip(r1, 0, rows)
        t = self._table
        hits = t[r1, c1] - t[r0, c1] - t[r1, c0] + t[r0, c0]
        return np.clip(hits / area, 0.0, 1.0).astype(np.float32)


def _mask_level(slide: Slide, mask_side: int) -> int:
    """The smallest level whose longer side is at least ``mask_side`` (level 0 if none)."""
    chosen = 0
    for level, (w, h) in enumerate(slide.level_dimensions):
        if max(w, h) >= mask_side:
            chosen = level
    return chosen


def _block_mean(strip: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``factor`` × ``factor`` blocks (the last row/column of blocks may be partial)."""
    if factor == 1:
        return strip
    h, w = strip.shape[:2]
    rows = np.arange(0, h, factor)
    cols = np.arange(0, w, factor)
    sums = np.add.reduceat(np.add.reduceat(strip.astype(np.float32), rows, 0), cols, 1)
    counts = np.outer(np.diff(np.append(rows, h)), np.diff(np.append(cols, w)))
    return np.rint(sums / counts[..., None]).astype(np.uint8)


def slide_tissue_mask(slide: Slide, options: TissueOptions | None = None) -> TissueMask:
    """The tissue mask of a slide, from a low-resolution level.

    Parameters
    ----------
    slide : Slide
        An open slide.
    options : TissueOptions, optional
        Thresholds and mask size (defaults: :class:`TissueOptions`).

    Returns
    -------
    TissueMask
        About ``mask_side`` pixels on the longer side (more when the slide has no level
        close to that size and its smallest suitable level is not a multiple of it).
    """
    options = options or TissueOptions()
    level = _mask_level(slide, options.mask_side)
    width, height = slide.level_dimensions[level]
    factor = max(1, math.floor(max(width, height) / options.mask_side))
    rows_per_strip = factor * max(1, _STRIP_PIXELS // max(1, width * factor))
    parts = []
    for y in range(0, height, rows_per_strip):
        strip = slide.read_level(level, 0, y, width, min(rows_per_strip, height - y))
        parts.append(
            tissue_mask(
                _block_mean(strip, factor),
                white=options.white,
                black=options.black,
                grey_tolerance=options.grey_tolerance,
            )
        )
    mask = np.concatenate(parts, axis=0)
    w0, h0 = slide.dimensions
    return TissueMask(mask, (w0 / mask.shape[1], h0 / mask.shape[0]), level)
