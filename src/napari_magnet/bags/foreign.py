"""Bags made elsewhere: CLAM's and TRIDENT's coordinate and feature files.

The layouts, as those tools write them (read from their public code; DESIGN §10):

CLAM ``create_patches_fp.py`` → ``patches/<slide>.h5``
    ``coords`` (N, 2) int64, level-0 top-left ``(x, y)``; attributes ``patch_size`` (pixels
    *at* ``patch_level``), ``patch_level``, ``downsample`` (that level's ``(dx, dy)``),
    ``downsampled_level_dim``, ``level_dim``, ``name``, ``save_path``. A patch covers
    ``patch_size × downsample`` level-0 pixels. No pixel size is recorded.
CLAM ``extract_features_fp.py`` → ``h5_files/<slide>.h5`` and ``pt_files/<slide>.pt``
    ``features`` (N, D) float32 and ``coords`` (N, 2) int32, no attributes; the ``.pt`` file
    is the feature tensor alone (read with ``torch.load(weights_only=True)``, never a plain
    unpickling), its coordinates are in the ``h5_files`` twin.
TRIDENT → ``<mag>x_<size>px_<overlap>px_overlap/patches/<slide>_patches.h5``
    ``coords`` (N, 2) int64 with ``patch_size`` (pixels at ``target_magnification``),
    ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``,
    ``name``, ``savetodir``, ``level0_width``, ``level0_height`` (no ``patch_level``); a
    ``None`` is stored as the string ``"None"``. Magnifications map to pixel sizes as
    ``mpp = 10 / magnification``.
TRIDENT → ``…/features_<encoder>/<slide>.h5``
    ``features`` (N, D) with attributes ``encoder``, ``name``, ``savetodir``, and ``coords``
    carrying the patches file's attributes.

Each file becomes a one-level :class:`~.records.Bag`. A CLAM features file records no patch
size: the extent is the smallest spacing of its coordinates (the grid step of a patching
without overlap), 0 when there is a single column and row. Imports torch only to read ``.pt``.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .records import Bag, BagLevel, mpp_of

__all__ = ["BagError", "foreign_kind", "plain_attrs", "read_foreign"]


class BagError(ValueError):
    """A file that is not a bag, or a damaged one: the file name and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, str) and value == "None":  # TRIDENT's stored None
        return None
    return value


def plain_attrs(attrs: h5py.AttributeManager) -> dict[str, Any]:
    """HDF5 attributes as Python values (numbers, str, lists of str, numeric arrays)."""
    return {str(k): _plain(v) for k, v in attrs.items()}


def foreign_kind(f: h5py.File) -> str | None:
    """``"trident-patches"``, ``"trident-features"``, ``"clam-patches"``, ``"clam-features"``
    or ``None`` for an open HDF5 file that is not one of those."""
    coords = f.get("coords")
    if not isinstance(coords, h5py.Dataset) or coords.ndim != 2 or coords.shape[1] != 2:
        return None
    has_features = isinstance(f.get("features"), h5py.Dataset)
    attrs = coords.attrs
    if "level0_magnification" in attrs and "target_magnification" in attrs:
        return "trident-features" if has_features else "trident-patches"
    if "patch_level" in attrs and "patch_size" in attrs:
        return "clam-features" if has_features else "clam-patches"
    if has_features:
        return "clam-features"
    return None


def _grid_step(values: np.ndarray) -> float:
    unique = np.unique(values)
    steps = np.diff(unique)
    return float(steps.min()) if len(steps) else 0.0


def _clam_level(coords: np.ndarray, attrs: dict, slide_mpp: tuple[float, float] | None):
    if "patch_size" in attrs and "downsample" in attrs:
        ds = np.broadcast_to(np.asarray(attrs["downsample"], dtype=np.float64), (2,))
        size = int(attrs["patch_size"])
        extent = (size * ds[0], size * ds[1])
        downsample = (float(ds[0]), float(ds[1]))
        level = int(attrs.get("patch_level", 0))
    else:  # a features file: no attribute at all
        extent = (_grid_step(coords[:, 0]), _grid_step(coords[:, 1]))
        size, downsample, level = int(round(extent[0])), None, None
        attrs = {**attrs, "extent_inferred": True}
    mpp = None
    if slide_mpp is not None and downsample is not None:
        mpp = float(slide_mpp[0]) * downsample[0]
    return extent, size, downsample, level, mpp, attrs


def _read_pt(path: Path) -> np.ndarray:
    import torch

    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling refusal or damage: one clear error
        raise BagError(path, f"not a feature tensor file: {error}") from error
    if not isinstance(value, torch.Tensor) or value.ndim != 2:
        raise BagError(path, "a CLAM .pt file holds one (N, D) feature tensor")
    return value.float().numpy()


def _clam_twin(pt: Path) -> Path | None:
    """``h5_files/<slide>.h5`` beside ``pt_files/<slide>.pt`` (or the same folder)."""
    for folder in (pt.parent.parent / "h5_files", pt.parent):
        candidate = folder / f"{pt.stem}.h5"
        if candidate.is_file():
            return candidate
    return None


def _slide_name(path: Path, attrs: dict) -> str:
    name = attrs.get("name")
    if isinstance(name, str) and name:
        return name
    stem = path.stem
    return stem[: -len("_patches")] if stem.endswith("_patches") else stem


def read_foreign(
    path: str | os.PathLike,
    features: bool = True,
    slide_mpp: tuple[float, float] | None = None,
) -> Bag:
    """Read a CLAM or TRIDENT coordinates or features file (``.h5``, or CLAM's ``.pt``).

    Parameters
    ----------
    path : path-like
        The file.
    features : bool
        Load the features (when the file has them).
    slide_mpp : (float, float), optional
        The slide's µm per level-0 pixel; CLAM's files do not record it (TRIDENT's record
        the magnification, which gives ``10 / magnification``).

    Raises
    ------
    BagError
        The file is not one of those layouts.
    """
    path = Path(path)
    pt_features = None
    if path.suffix.lower() == ".pt":
        pt_features = _read_pt(path) if features else None
        twin = _clam_twin(path)
        if twin is None:
            raise BagError(path, "a CLAM .pt holds features only; its h5_files twin is missing")
        bag = read_foreign(twin, features=False, slide_mpp=slide_mpp)
        level = bag.levels[0]
        if pt_features is not None and len(pt_features) != len(level):
            raise BagError(path, f"{len(pt_features)} features for {len(level)} coordinates")
        return replace(bag, levels=(replace(level, features=pt_features),), path=path)
    try:
        if not h5py.is_hdf5(path):
            raise BagError(path, "not an HDF5 file")
        with h5py.File(path, "r") as f:
            kind = foreign_kind(f)
            if kind is None:
                raise BagError(path, "HDF5 without a (N, 2) 'coords' dataset: not a bag")
            coords = np.asarray(f["coords"][()], dtype=np.int64).reshape(-1, 2)
            attrs = plain_attrs(f["coords"].attrs)
            feats = f["features"] if "features" in f else None
            if feats is not None:
                attrs["features_attrs"] = plain_attrs(feats.attrs)
            array = feats[()] if (features and feats is not None) else None
            root = plain_attrs(f.attrs)
    except OSError as error:
        raise BagError(path, f"unreadable: {error}") from error
    if array is not None and (array.ndim != 2 or len(array) != len(coords)):
        raise BagError(path, f"features of shape {array.shape} for {len(coords)} coordinates")
    size0 = None
    if kind.startswith("trident"):
        try:
            size = int(attrs["patch_size"])
            side = float(attrs["patch_size_level0"])
            mpp = mpp_of(float(attrs["target_magnification"]))
            src = mpp_of(float(attrs["level0_magnification"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            raise BagError(path, f"TRIDENT coords attributes incomplete: {error}") from error
        extent, level, downsample = (side, side), None, (side / size, side / size)
        slide_mpp = slide_mpp or (src, src)
        if "level0_width" in attrs and "level0_height" in attrs:
            size0 = (int(attrs["level0_width"]), int(attrs["level0_height"]))
    else:
        extent, size, downsample, level, mpp, attrs = _clam_level(coords, attrs, slide_mpp)
        if level == 0 and "level_dim" in attrs:
            size0 = tuple(int(v) for v in np.asarray(attrs["level_dim"]).reshape(-1)[:2])
    bag_level = BagLevel(
        name="/",
        coords=coords,
        extent=extent,
        patch_size=size,
        mpp=mpp,
        patch_level=level,
        downsample=downsample,
        features=array,
        attrs=attrs,
    )
    return Bag(
        source=kind,
        slide_name=_slide_name(path, attrs),
        levels=(bag_level,),
        level0_size=size0,
        slide_mpp=None if slide_mpp is None else (float(slide_mpp[0]), float(slide_mpp[1])),
        path=path,
        attrs=root,
    )
