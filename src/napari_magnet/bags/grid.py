"""Nested patch grids at target pixel sizes (µm per pixel), never pyramid level indices.

Magnifications are given as target µm per pixel, coarsest first (``(8, 4, 1)`` ≈ 1.25×,
2.5×, 10×). A patch of ``patch_size`` pixels at ``mpp`` covers ``patch_size · mpp / mpp0``
level-0 pixels (a float: ``mpp0`` is the slide's own, 0.499 on an Aperio 20× scan), and its
pixels are read from the **coarsest pyramid level that still has at least ``patch_size``
pixels across it** (:meth:`SlideGeometry.choose_level`, rule "enough", from the file's own
level dimensions — 4×-step pyramids, 40× scans and float downsamples are handled the same
way), then resampled to ``patch_size`` (:mod:`.pixels`).

Nesting
-------
Each magnification's pixel size must divide the previous one's by an integer ``r`` (8 → 4:
``r = 2``; 4 → 1: ``r = 4``), so a patch of the coarser magnification is exactly ``r × r``
patches of the finer one. The grids share the origin (the slide's top-left corner) and the
level-0 position of every patch is computed from its index on the *finest* grid, so a parent
and its first child have the same rounded coordinates and a child never pokes out of its
parent by more than the rounding (coordinates are the exact float positions rounded to the
nearest level-0 pixel). Order:

* the coarsest magnification: patches row-major over the slide (rows top to bottom, columns
  left to right), keeping those that hold tissue, at least ``min_fraction`` of their area;
* every finer magnification: for each patch of the previous magnification, in its stored
  order, its ``r²`` children in row-major order within the parent. Child ``k`` of parent
  ``p`` is therefore patch ``p · r² + k``, and ``parent`` is ``repeat(arange(N), r²)``.

Children on glass
-----------------
Only the coarsest magnification is tissue-filtered. **Every parent keeps all ``r²`` of its
children, those on glass (and those past the slide's edge, which read as background) too**,
and every level records each patch's tissue fraction (``tissue``). The fixed fan-out keeps
the zoom step of ZoomMIL-style models a plain reshape (``(N, r², D)``) instead of a ragged
gather, keeps the files' order the same whatever the mask says, and leaves the choice to the
model: mask a child with ``tissue == 0`` or let attention learn to ignore glass.

The coarse grid covers the whole slide (``ceil(width / extent)`` columns); patches overhanging
the right or bottom edge are kept when they hold enough tissue. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..slide import SlideGeometry
from .records import BagLevel, magnification_of
from .tissue import TissueMask

__all__ = ["MagnificationPlan", "level_name", "nested_grid", "parse_mpps", "plan_magnifications"]


#: A target pixel size may be this much finer than the slide's (0.5 µm/px on a 0.55 scan).
UPSAMPLE_TOLERANCE = 0.9


def level_name(mpp: float) -> str:
    """The HDF5 group name of a magnification: ``mpp_8``, ``mpp_0.5``."""
    return f"mpp_{float(mpp):g}"


def parse_mpps(value: str | Sequence[float]) -> tuple[float, ...]:
    """Target pixel sizes from ``"8,4,1"`` or a sequence, checked for nesting.

    Raises
    ------
    ValueError
        Unless every value is a positive finite number, strictly decreasing, each dividing
        the previous one by an integer.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        mpps = tuple(float(v) for v in items if str(v).strip())
    except ValueError as error:
        raise ValueError(f"µm per pixel must be numbers, got {value!r}") from error
    if not mpps:
        raise ValueError("give at least one µm-per-pixel value, e.g. 8,4,1")
    for m in mpps:
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"µm per pixel must be positive, got {m}")
    for coarse, fine in zip(mpps, mpps[1:]):
        ratio = coarse / fine
        if ratio <= 1 or abs(ratio - round(ratio)) > 1e-6 * ratio:
            raise ValueError(
                f"µm per pixel {coarse:g} → {fine:g}: nested grids need each value to be the "
                "previous one divided by an integer ≥ 2, coarsest first (e.g. 8,4,1)"
            )
    return mpps


@dataclass(frozen=True)
class MagnificationPlan:
    """Where one magnification's patches come from.

    Parameters
    ----------
    mpp : float
        Target µm per pixel.
    patch_size : int
        Patch side in pixels at ``mpp``.
    extent : (float, float)
        Level-0 ``(width, height)`` of a patch.
    downsample : (float, float)
        Level-0 pixels per patch pixel.
    patch_level : int
        The coarsest pyramid level with at least ``patch_size`` pixels across a patch.
    fan_out : int
        ``r``: children per side of a patch of the previous magnification (1 at the first).
    """

    mpp: float
    patch_size: int
    extent: tuple[float, float]
    downsample: tuple[float, float]
    patch_level: int
    fan_out: int

    @property
    def patch_size_level0(self) -> int:
        """Level-0 side of a patch rounded to a pixel (TRIDENT's ``patch_size_level0``)."""
        return int(round(self.extent[0]))

    def coords_attrs(self, geometry: SlideGeometry, slide_mpp: tuple[float, float]) -> dict:
        """The ``coords`` attributes CLAM and TRIDENT readers expect, plus ours."""
        w0, h0 = geometry.dimensions
        level_dim = np.asarray(geometry.level_dimensions[self.patch_level], dtype=np.int64)
        return {
            # TRIDENT (patch_size at the target magnification, like CLAM's resized patches)
            "patch_size": int(self.patch_size),
            "patch_size_level0": self.patch_size_level0,
            "level0_magnification": magnification_of(slide_mpp[0]),
            "target_magnification": magnification_of(self.mpp),
            "overlap": 0,
            "level0_width": int(w0),
            "level0_height": int(h0),
            # CLAM (downsample: level-0 pixels per patch pixel, so patch_size × downsample
            # is the level-0 extent, as CLAM's stitching assumes)
            "patch_level": int(self.patch_level),
            "downsample": np.asarray(self.downsample, dtype=np.float64),
            "level_dim": level_dim,
            "downsampled_level_dim": level_dim,
            # ours
            "mpp": float(self.mpp),
            "extent_level0": np.asarray(self.extent, dtype=np.float64),
            "fan_out": int(self.fan_out),
        }


def plan_magnifications(
    geometry: SlideGeometry,
    slide_mpp: tuple[float, float],
    mpps: Sequence[float],
    patch_size: int,
) -> tuple[MagnificationPlan, ...]:
    """The level-0 extent, read level and fan-out of each magnification.

    Parameters
    ----------
    geometry : SlideGeometry
        The slide's level dimensions and downsamples.
    slide_mpp : (float, float)
        µm per level-0 pixel ``(x, y)``.
    mpps : sequence of float
        Target µm per pixel, coarsest first (checked by :func:`parse_mpps`).
    patch_size : int
        Patch side in pixels at every magnification.

    Raises
    ------
    ValueError
        Bad values, or a target more than 10 % finer than the slide's pixels (upsampling).
    """
    mpps = parse_mpps(mpps)
    if int(patch_size) < 1:
        raise ValueError(f"patch size must be positive, got {patch_size}")
    mx, my = (float(v) for v in slide_mpp)
    if not (mx > 0 and my > 0 and math.isfinite(mx) and math.isfinite(my)):
        raise ValueError(f"the slide's µm per pixel must be positive, got {slide_mpp}")
    if mpps[-1] < UPSAMPLE_TOLERANCE * min(mx, my):
        raise ValueError(
            f"{mpps[-1]:g} µm per pixel is finer than the slide's own "
            f"{min(mx, my):.4g} µm per pixel: the patches would be invented by upsampling"
        )
    plans = []
    for k, mpp in enumerate(mpps):
        ds = (mpp / mx, mpp / my)
        extent = (patch_size * ds[0], patch_size * ds[1])
        level = geometry.choose_level(extent[0], extent[1], int(patch_size), rule="enough")
        fan_out = 1 if k == 0 else int(round(mpps[k - 1] / mpp))
        plans.append(MagnificationPlan(float(mpp), int(patch_size), extent, ds, level, fan_out))
    return tuple(plans)


def _child_offsets(r: int) -> np.ndarray:
    """``(r², 2)`` (column, row) offsets of a parent's children, row-major."""
    rows, cols = np.divmod(np.arange(r * r), r)
    return np.stack([cols, rows], axis=1).astype(np.int64)


def nested_grid(
    plans: Sequence[MagnificationPlan],
    level0_size: tuple[int, int],
    tissue: TissueMask | None = None,
    min_fraction: float = 0.0,
) -> tuple[BagLevel, ...]:
    """The nested patch grids, coarsest first (see the module notes for the order).

    Parameters
    ----------
    plans : sequence of MagnificationPlan
        From :func:`plan_magnifications`.
    level0_size : (int, int)
        The slide's level-0 ``(width, height)``.
    tissue : TissueMask, optional
        Filters the coarsest magnification and gives every patch its ``tissue`` fraction;
        ``None`` keeps every coarse patch (fractions 1).
    min_fraction : float
        Coarse patches with a smaller tissue fraction, or none at all, are dropped.

    Returns
    -------
    tuple of BagLevel
        ``coords``, ``parent``, ``grid`` and ``tissue`` set, ``features`` None.
    """
    if not plans:
        raise ValueError("no magnification to grid")
    width, height = level0_size
    finest = plans[-1]
    unit = np.asarray(finest.extent, dtype=np.float64)  # level-0 size of a finest patch
    scale = [int(round(p.mpp / finest.mpp)) for p in plans]  # finest patches per side

    first = plans[0]
    cols = max(1, math.ceil(width / first.extent[0] - 1e-9))
    rows = max(1, math.ceil(height / first.extent[1] - 1e-9))
    r_idx, c_idx = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)
    grid = np.stack([c_idx, r_idx], axis=1)
    parent = np.full(len(grid), -1, dtype=np.int64)

    levels = []
    for k, plan in enumerate(plans):
        if k > 0:
            r = plan.fan_out
            n_parents = len(grid)
            grid = (grid[:, None, :] * r + _child_offsets(r)[None]).reshape(-1, 2)
            parent = np.repeat(np.arange(n_parents, dtype=np.int64), r * r)
        coords = np.rint(grid * scale[k] * unit).astype(np.int64)
        if tissue is None:
            fraction = np.ones(len(grid), dtype=np.float32)
        else:
            fraction = tissue.fractions(coords, plan.extent)
        if k == 0 and tissue is not None:
            keep = (fraction > 0) & (fraction >= min_fraction)
            grid, coords, parent, fraction = grid[keep], coords[keep], parent[keep], fraction[keep]
        levels.append(
            BagLevel(
                name=level_name(plan.mpp),
                coords=coords,
                extent=plan.extent,
                patch_size=plan.patch_size,
                mpp=plan.mpp,
                patch_level=plan.patch_level,
                downsample=plan.downsample,
                parent=parent,
                grid=grid,
                tissue=fraction,
            )
        )
    return tuple(levels)
