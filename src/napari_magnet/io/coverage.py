"""The coverage grid: which tissue each magnifying layer looked at, and which it never examined.

Pure numpy. :func:`tissue_mask` finds tissue on a thumbnail, :func:`coverage_map` marks each
cell of a coarse grid over the slide with the deepest layer whose regions cover it,
:func:`coverage_placement` lays the grid over the slide in napari world µm, and
:func:`coverage_colors` / :func:`coverage_legend` give its colours and the legend that names
them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .coords import mpp_or_unit

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine.types import MagnifyStep

__all__ = [
    "UNEXAMINED",
    "coverage_colors",
    "coverage_grid_shape",
    "coverage_legend",
    "coverage_map",
    "coverage_placement",
    "coverage_summary",
    "resize_mask",
    "tissue_mask",
]

#: Value of :func:`coverage_map` for tissue no magnifying layer looked at.
UNEXAMINED = 255


def tissue_mask(
    rgb: np.ndarray, white: int = 215, black: int = 40, grey_tolerance: int = 15
) -> np.ndarray:
    """Tissue pixels of a low-resolution RGB thumbnail.

    Parameters
    ----------
    rgb : np.ndarray
        ``(H, W, 3)`` RGB (more channels are ignored).
    white, black : int
        Pixels whose channels are all at least ``white`` (glass) or all at most ``black``
        (padding, scanner borders) are not tissue.
    grey_tolerance : int
        Nor are flat greys (DESIGN §4's grey filter: R, G, B within ``grey_tolerance`` of
        each other — smudges and out-of-focus glass).

    Returns
    -------
    np.ndarray
        ``(H, W)`` bool, True on tissue.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got {rgb.shape}")
    c = rgb[..., :3].astype(np.int16)
    lo, hi = c.min(axis=-1), c.max(axis=-1)
    near_white = lo >= white
    dark = hi <= black
    grey = (hi - lo) < grey_tolerance
    return ~(near_white | dark | grey)


def resize_mask(mask: np.ndarray, shape: Sequence[int], threshold: float = 0.25) -> np.ndarray:
    """Resample a boolean mask to another grid.

    Parameters
    ----------
    mask : np.ndarray
        ``(h, w)`` bool.
    shape : (rows, cols)
        The new grid.
    threshold : float
        A cell is True when at least this fraction of the mask pixels it covers are
        (area-weighted on the mask's own grid; a grid finer than the mask takes the nearest
        mask pixel).

    Returns
    -------
    np.ndarray
        ``(rows, cols)`` bool.
    """
    mask = np.asarray(mask, dtype=bool)
    gh, gw = (int(v) for v in shape)
    h, w = mask.shape
    if (h, w) == (gh, gw):
        return mask.copy()
    # which grid cell each mask pixel centre falls into (every pixel counts once)
    rows = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(int), gh - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(int), gw - 1)
    cell = (rows[:, None] * gw + cols[None, :]).ravel()
    total = np.bincount(cell, minlength=gh * gw).reshape(gh, gw).astype(float)
    hits = np.bincount(cell, weights=mask.ravel().astype(float), minlength=gh * gw).reshape(gh, gw)
    if (total == 0).any():  # grid finer than the mask: nearest mask pixel
        ri = np.minimum(((np.arange(gh) + 0.5) * h / gh).astype(int), h - 1)
        ci = np.minimum(((np.arange(gw) + 0.5) * w / gw).astype(int), w - 1)
        nearest = mask[np.ix_(ri, ci)]
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(total > 0, hits / np.maximum(total, 1), nearest.astype(float))
        return frac >= threshold
    return hits / total >= threshold


def coverage_grid_shape(slide_dims: Sequence[int], max_side: int = 512) -> tuple[int, int]:
    """The shape of a coverage grid over a slide.

    Parameters
    ----------
    slide_dims : (width, height)
        Level-0 size of the slide.
    max_side : int
        Cells along the slide's longer side.

    Returns
    -------
    (rows, cols)
        The slide's aspect, at least 1 each.
    """
    width, height = (float(v) for v in slide_dims)
    longer = max(width, height)
    rows = max(1, round(height / longer * max_side))
    cols = max(1, round(width / longer * max_side))
    return (int(rows), int(cols))


def coverage_map(
    steps: Iterable[MagnifyStep],
    slide_dims: Sequence[int],
    tissue_mask: np.ndarray | None = None,
    grid_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Which tissue each magnifying layer looked at, on a coarse grid over the slide.

    Parameters
    ----------
    steps : iterable of MagnifyStep
        The run's steps so far.
    slide_dims : (width, height)
        Level-0 size of the slide.
    tissue_mask : np.ndarray, optional
        Boolean tissue mask of the whole slide at any resolution (e.g. :func:`tissue_mask` of
        ``slide.thumbnail(1024)``); resampled to the grid. ``None``: every cell is tissue.
    grid_shape : (rows, cols), optional
        Default: the tissue mask's shape, or :func:`coverage_grid_shape`.

    Returns
    -------
    np.ndarray
        ``(rows, cols)`` uint8: ``k`` (1 … number of layers) on tissue whose cell lies inside a
        region of layer ``k`` and of no deeper layer — the highest magnification that looked
        at it; :data:`UNEXAMINED` (255) on tissue no region covered; ``0`` off tissue. A cell
        is covered by a region when its centre lies inside the region's box; a region smaller
        than a cell still marks the cell holding its centre.
    """
    width, height = (float(v) for v in slide_dims)
    if grid_shape is None:
        grid_shape = (
            tissue_mask.shape[:2] if tissue_mask is not None else coverage_grid_shape(slide_dims)
        )
    gh, gw = (int(v) for v in grid_shape)
    if gh < 1 or gw < 1 or width <= 0 or height <= 0:
        raise ValueError(f"bad grid {grid_shape} or slide size {slide_dims}")
    depth = np.zeros((gh, gw), dtype=np.uint8)
    cx = (np.arange(gw) + 0.5) * width / gw
    cy = (np.arange(gh) + 0.5) * height / gh
    for step in sorted(steps, key=lambda s: s.layer):
        layer = int(step.layer)
        if not 1 <= layer < UNEXAMINED:
            raise ValueError(f"layer {layer} out of range")
        for x0, y0, x1, y1 in np.asarray(step.boxes, dtype=float).reshape(-1, 4):
            ix = (cx >= x0) & (cx < x1)
            iy = (cy >= y0) & (cy < y1)
            if ix.any() and iy.any():
                depth[np.ix_(iy, ix)] = np.maximum(depth[np.ix_(iy, ix)], layer)
            else:  # smaller than a cell: the cell holding its centre
                j = int(np.clip((x0 + x1) / 2.0 / width * gw, 0, gw - 1))
                i = int(np.clip((y0 + y1) / 2.0 / height * gh, 0, gh - 1))
                depth[i, j] = max(depth[i, j], layer)
    if tissue_mask is None:
        tissue = np.ones((gh, gw), dtype=bool)
    else:
        tissue = resize_mask(tissue_mask, (gh, gw))
    out = np.where(tissue, depth, 0).astype(np.uint8)
    out[tissue & (depth == 0)] = UNEXAMINED
    return out


def coverage_placement(
    slide_dims: Sequence[int], grid_shape: Sequence[int], mpp: Sequence[float] | None
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where a coverage grid lies on the slide in napari world µm.

    Parameters
    ----------
    slide_dims : (width, height)
        Level-0 size of the slide.
    grid_shape : (rows, cols)
        The grid.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.

    Returns
    -------
    (scale, translate)
        napari ``(row, col)`` scale and translate of the grid's Labels layer.
    """
    width, height = (float(v) for v in slide_dims)
    gh, gw = (int(v) for v in grid_shape)
    mx, my = mpp_or_unit(mpp)
    sr, sc = height / gh * my, width / gw * mx
    return (sr, sc), (sr / 2.0, sc / 2.0)


def coverage_summary(coverage: np.ndarray) -> dict[str, float]:
    """What fraction of the tissue the run examined.

    Parameters
    ----------
    coverage : np.ndarray
        A grid from :func:`coverage_map`.

    Returns
    -------
    dict of str to float
        ``tissue_cells`` (count), and fractions of them: ``examined`` (any layer),
        ``unexamined``, and ``layer_k`` (deepest layer k) for every layer present.
    """
    cov = np.asarray(coverage)
    tissue = cov > 0
    n = int(tissue.sum())
    out: dict[str, float] = {"tissue_cells": float(n)}
    if n == 0:
        out.update(examined=0.0, unexamined=0.0)
        return out
    out["unexamined"] = float((cov == UNEXAMINED).sum() / n)
    out["examined"] = 1.0 - out["unexamined"]
    for k in sorted(set(np.unique(cov[tissue]).tolist()) - {UNEXAMINED}):
        out[f"layer_{int(k)}"] = float((cov == k).sum() / n)
    return out


#: Named colours of the layers in a coverage grid (shallow → deep), and of unexamined tissue.
COVERAGE_PALETTE: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("blue", (0.23, 0.30, 0.75)),
    ("teal", (0.13, 0.57, 0.55)),
    ("green", (0.42, 0.76, 0.24)),
    ("yellow", (0.99, 0.91, 0.14)),
)
UNEXAMINED_COLOR = ("red", (0.85, 0.10, 0.10))


def _layer_palette(n_layers: int) -> list[tuple[str, tuple[float, float, float]]]:
    """Named colours of layers 1 … n: palette entries spread from blue to yellow (blends
    between neighbouring entries beyond four layers)."""
    n = max(int(n_layers), 1)
    last = len(COVERAGE_PALETTE) - 1
    if n <= len(COVERAGE_PALETTE):
        picks = [0] if n == 1 else [int(np.floor(k * last / (n - 1) + 0.5)) for k in range(n)]
        return [COVERAGE_PALETTE[i] for i in picks]
    out = []
    for k in range(n):
        pos = k * last / (n - 1)
        lo = min(int(math.floor(pos)), last - 1)
        t = pos - lo
        a, b = np.array(COVERAGE_PALETTE[lo][1]), np.array(COVERAGE_PALETTE[lo + 1][1])
        name = (
            COVERAGE_PALETTE[lo][0]
            if t < 0.1
            else COVERAGE_PALETTE[lo + 1][0]
            if t > 0.9
            else f"{COVERAGE_PALETTE[lo][0]}-{COVERAGE_PALETTE[lo + 1][0]}"
        )
        out.append((name, tuple(float(v) for v in a + (b - a) * t)))
    return out  # type: ignore[return-value]


def coverage_colors(n_layers: int) -> dict[int, tuple[float, float, float, float]]:
    """The colours of a coverage grid's values.

    Parameters
    ----------
    n_layers : int
        Number of magnifying layers.

    Returns
    -------
    dict of int to RGBA
        Layer 1 … ``n_layers`` from blue (shallowest) to yellow (deepest) through
        :data:`COVERAGE_PALETTE`, :data:`UNEXAMINED` tissue red, 0 transparent.
    """
    colors: dict[int, tuple[float, float, float, float]] = {0: (0.0, 0.0, 0.0, 0.0)}
    for k, (_, rgb) in enumerate(_layer_palette(n_layers), start=1):
        colors[k] = (*rgb, 1.0)
    colors[UNEXAMINED] = (*UNEXAMINED_COLOR[1], 1.0)
    return colors


def coverage_legend(n_layers: int) -> str:
    """The legend of a coverage grid, naming its colours.

    Parameters
    ----------
    n_layers : int
        Number of magnifying layers.

    Returns
    -------
    str
        Three short lines (they fit a narrow canvas), e.g. ``"Coverage — deepest layer that
        looked:\nL1 blue · L2 green · L3 yellow\nred: tissue never examined · clear:
        glass"``.
    """
    layers = " · ".join(
        f"L{k} {name}" for k, (name, _) in enumerate(_layer_palette(n_layers), start=1)
    )
    return (
        f"Coverage — deepest layer that looked:\n{layers}\n"
        f"{UNEXAMINED_COLOR[0]}: tissue never examined · clear: glass"
    )
