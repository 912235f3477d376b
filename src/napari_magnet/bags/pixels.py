"""A patch's pixels: read from its level (the coarsest with enough pixels) and resampled.

The patch's level-0 box is mapped onto its ``patch_level`` with that level's exact scale
(level-0 size over level size, never a rounded downsample), the smallest window of whole
level pixels holding it is read through :meth:`Slide.read_level` (background colour past the
slide's edge), and the exact, fractional box is area-resampled to ``patch_size`` pixels with
two small weight matrices. This is the reference path: the embedder batches the same reads
and resamples on the device. Imports neither torch nor napari.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np

from ..slide import Slide
from .records import BagLevel

__all__ = ["area_weights", "iter_patch_batches", "read_patch"]


def area_weights(start: float, stop: float, size: int, pixels: int) -> np.ndarray:
    """Weights that area-resample the source interval ``[start, stop)`` to ``size`` pixels.

    Parameters
    ----------
    start, stop : float
        The interval in source pixels (0 = the first source pixel's left edge).
    size : int
        Output pixels.
    pixels : int
        Source pixels available.

    Returns
    -------
    np.ndarray
        ``(size, pixels)`` float32; row ``i`` holds the share of each source pixel in output
        pixel ``i`` and sums to 1 (when the interval lies inside the source).
    """
    step = (stop - start) / size
    a = start + np.arange(size) * step
    b = a + step
    j = np.arange(pixels)
    overlap = np.minimum(b[:, None], j[None, :] + 1) - np.maximum(a[:, None], j[None, :])
    weights = np.clip(overlap, 0.0, None) / step
    return weights.astype(np.float32)


def read_patch(slide: Slide, level: BagLevel, x: int, y: int) -> np.ndarray:
    """One patch at its target pixel size.

    Parameters
    ----------
    slide : Slide
        The open slide the bag was made from.
    level : BagLevel
        The patch's magnification (``patch_level``, ``extent``, ``patch_size``).
    x, y : int
        Level-0 top-left of the patch.

    Returns
    -------
    np.ndarray
        ``(patch_size, patch_size, 3)`` uint8 RGB.
    """
    lv = 0 if level.patch_level is None else int(level.patch_level)
    sx, sy = slide.geometry.level_scale(lv)
    fx0, fy0 = x / sx, y / sy
    fx1, fy1 = (x + level.extent[0]) / sx, (y + level.extent[1]) / sy
    ix0, iy0 = math.floor(fx0 + 1e-9), math.floor(fy0 + 1e-9)
    ix1, iy1 = max(math.ceil(fx1 - 1e-9), ix0 + 1), max(math.ceil(fy1 - 1e-9), iy0 + 1)
    window = slide.read_level(lv, ix0, iy0, ix1 - ix0, iy1 - iy0).astype(np.float32)
    size = int(level.patch_size)
    wy = area_weights(fy0 - iy0, fy1 - iy0, size, iy1 - iy0)
    wx = area_weights(fx0 - ix0, fx1 - ix0, size, ix1 - ix0)
    rows = np.tensordot(wy, window, axes=(1, 0))  # (size, w, 3)
    out = np.tensordot(rows, wx, axes=(1, 1))  # (size, 3, size)
    return np.clip(np.rint(out.transpose(0, 2, 1)), 0, 255).astype(np.uint8)


def iter_patch_batches(
    slide: Slide, level: BagLevel, indices: Iterable[int] | None = None, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Patches of one magnification in batches, in the bag's order.

    Parameters
    ----------
    slide : Slide
        The open slide.
    level : BagLevel
        The magnification.
    indices : iterable of int, optional
        Patches to read (default: all).
    batch_size : int
        Patches per batch.

    Yields
    ------
    (np.ndarray, np.ndarray)
        ``(B,)`` int64 indices and ``(B, patch_size, patch_size, 3)`` uint8 patches.
    """
    order = np.arange(len(level)) if indices is None else np.asarray(list(indices), np.int64)
    for start in range(0, len(order), max(1, int(batch_size))):
        chunk = order[start : start + batch_size]
        yield chunk, np.stack([read_patch(slide, level, *level.coords[i]) for i in chunk])
