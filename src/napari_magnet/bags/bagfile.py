"""One HDF5 file per slide holding its nested patch grids (and, later, their embeddings).

Layout (h5py; every write goes to a temporary file beside the target and is renamed onto it
with :func:`napari_magnet.io.atomic.atomic_path`, so a killed run leaves the old file or the
new one, never half of one)::

    /                       attrs: format="napari-magnet-bag", format_version=1,
                            slide_name, slide_file, slide_path (absolute, when patched),
                            level0_width, level0_height,
                            mpp_x, mpp_y, mpp_source, patch_size, magnifications (µm/px,
                            coarsest first), levels (group names), tissue_level,
                            tissue_fraction, config (JSON: what made it), created_by
    /mpp_8/                 one group per magnification, coarsest first
                            attrs: mpp, magnification (10 / mpp), index, fan_out
        coords   (N, 2) int64   level-0 top-left (x, y); attrs (CLAM / TRIDENT names):
                            patch_size, patch_size_level0, level0_magnification,
                            target_magnification, overlap, level0_width, level0_height,
                            patch_level, downsample, level_dim, downsampled_level_dim,
                            name, savetodir, save_path; ours: mpp, extent_level0, fan_out
        parent   (N,)   int64   index of the parent patch in the previous group (-1 at the
                                first); a parent's children are contiguous, row-major
        grid     (N, 2) int64   (column, row) on this magnification's grid
        tissue   (N,)   float32 tissue fraction of the patch
        features (N, D)         added by an embedder (:func:`add_features`); attrs encoder, …
    /mpp_4/ …
    /coords                 hard link to the finest group's coords (and /features to its
                            features once added): tools that read one ``coords`` dataset at
                            the root (CLAM, TRIDENT) see the finest grid

:func:`read_bag` returns a :class:`~.records.Bag` for our files and for CLAM's and TRIDENT's
(:mod:`.foreign`); :func:`validate_bag` says what is wrong with a file (nothing: it can be
skipped on a resumed run). Imports neither torch nor napari.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..io.atomic import atomic_path
from .foreign import BagError, foreign_kind, plain_attrs, read_foreign
from .records import Bag, BagLevel, magnification_of

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BagError",
    "add_features",
    "bag_kind",
    "read_bag",
    "validate_bag",
    "write_bag",
]

FORMAT = "napari-magnet-bag"
FORMAT_VERSION = 1
_LEVEL_DATASETS = ("coords", "parent", "grid", "tissue")


def write_bag(path: str | os.PathLike, bag: Bag, coords_attrs: Mapping[str, Mapping]) -> Path:
    """Write a bag file atomically.

    Parameters
    ----------
    path : path-like
        The ``.h5`` file (replaced if it exists; its folder is created).
    bag : Bag
        Levels with ``coords``, ``parent``, ``grid`` and ``tissue`` (features optional);
        ``slide_mpp`` and ``level0_size`` set. Its ``attrs`` become root attributes.
    coords_attrs : mapping
        Level name → the ``coords`` attributes (:meth:`.grid.MagnificationPlan.coords_attrs`).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if not bag.levels or bag.slide_mpp is None or bag.level0_size is None:
        raise ValueError("a bag needs at least one level, the slide's mpp and its size")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        root = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "slide_name": bag.slide_name,
            "level0_width": int(bag.level0_size[0]),
            "level0_height": int(bag.level0_size[1]),
            "mpp_x": float(bag.slide_mpp[0]),
            "mpp_y": float(bag.slide_mpp[1]),
            "magnifications": np.asarray([lv.mpp for lv in bag.levels], dtype=np.float64),
            "levels": [lv.name for lv in bag.levels],
            "created_by": f"napari-magnet {__version__}",
            **dict(bag.attrs),
        }
        for key, value in root.items():
            f.attrs[key] = value
        for index, level in enumerate(bag.levels):
            group = f.create_group(level.name)
            group.attrs.update(
                {
                    "mpp": float(level.mpp),
                    "magnification": magnification_of(level.mpp),
                    "index": index,
                    "fan_out": int(dict(coords_attrs[level.name]).get("fan_out", 1)),
                }
            )
            dset = group.create_dataset("coords", data=level.coords, dtype=np.int64)
            attrs = {
                "name": bag.slide_name,
                "savetodir": str(path.parent),
                "save_path": str(path.parent),
            }
            attrs.update(coords_attrs[level.name])
            for key, value in attrs.items():
                dset.attrs[key] = value
            group.create_dataset("parent", data=level.parent, dtype=np.int64)
            group.create_dataset("grid", data=level.grid, dtype=np.int64)
            group.create_dataset("tissue", data=level.tissue, dtype=np.float32)
            if level.features is not None:
                group.create_dataset("features", data=level.features)
        finest = bag.levels[-1].name
        f["coords"] = f[f"{finest}/coords"]
        if "features" in f[finest]:
            f["features"] = f[f"{finest}/features"]
    return path


def bag_kind(path: str | os.PathLike) -> str | None:
    """What kind of bag file ``path`` is, cheaply; ``None`` when it is no bag.

    Returns
    -------
    str or None
        ``"napari-magnet"``, ``"trident-patches"``, ``"trident-features"``,
        ``"clam-patches"``, ``"clam-features"``, or ``None`` (not HDF5, unreadable, or
        HDF5 without a ``coords`` dataset).
    """
    try:
        if not h5py.is_hdf5(os.fspath(path)):
            return None
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") == FORMAT:
                return "napari-magnet"
            return foreign_kind(f)
    except (OSError, ValueError):
        return None


def _level(group: h5py.Group, features: bool) -> BagLevel:
    coords = group["coords"]
    attrs = plain_attrs(coords.attrs)
    feats = group["features"] if "features" in group else None
    if feats is not None:
        attrs["features_attrs"] = plain_attrs(feats.attrs)
    extent = attrs.get("extent_level0", (attrs["patch_size_level0"],) * 2)
    downsample = np.broadcast_to(np.asarray(attrs["downsample"], dtype=np.float64), (2,))
    return BagLevel(
        name=group.name.strip("/"),
        coords=coords[()],
        extent=(float(extent[0]), float(extent[1])),
        patch_size=int(attrs["patch_size"]),
        mpp=float(group.attrs["mpp"]),
        patch_level=int(attrs["patch_level"]),
        downsample=(float(downsample[0]), float(downsample[1])),
        parent=group["parent"][()],
        grid=group["grid"][()],
        tissue=group["tissue"][()],
        features=feats[()] if (features and feats is not None) else None,
        attrs=attrs,
    )


def read_bag(
    path: str | os.PathLike,
    features: bool = True,
    slide_mpp: tuple[float, float] | None = None,
) -> Bag:
    """Read a bag file: ours, or CLAM's or TRIDENT's (coords or features files, ``.pt`` too).

    Parameters
    ----------
    path : path-like
        The file.
    features : bool
        Load the ``features`` arrays (False: leave them ``None``, to read only the grids).
    slide_mpp : (float, float), optional
        The slide's µm per level-0 pixel, for files that do not record it (CLAM's).

    Raises
    ------
    BagError
        The file is missing, not HDF5 (nor a CLAM ``.pt``), or not a bag of a known layout.
    """
    path = Path(path)
    if not path.is_file():
        raise BagError(path, "file not found")
    if path.suffix.lower() == ".pt" or bag_kind(path) != "napari-magnet":
        return read_foreign(path, features=features, slide_mpp=slide_mpp)
    try:
        with h5py.File(path, "r") as f:
            root = plain_attrs(f.attrs)
            levels = tuple(_level(f[name], features) for name in root["levels"])
            return Bag(
                source="napari-magnet",
                slide_name=str(root["slide_name"]),
                levels=levels,
                level0_size=(int(root["level0_width"]), int(root["level0_height"])),
                slide_mpp=(float(root["mpp_x"]), float(root["mpp_y"])),
                path=path,
                attrs=root,
            )
    except (KeyError, OSError, ValueError, TypeError) as error:
        raise BagError(path, f"damaged napari-magnet bag: {error}") from error


def _check_level(f: h5py.File, name: str, previous: int | None) -> tuple[list[str], int]:
    if name not in f:
        return [f"group {name} is missing"], 0
    group = f[name]
    missing = [d for d in _LEVEL_DATASETS if d not in group]
    if missing:
        return [f"{name}: datasets {missing} are missing"], 0
    n = group["coords"].shape[0]
    problems = []
    if group["coords"].shape != (n, 2):
        problems.append(f"{name}/coords has shape {group['coords'].shape}")
    for key in ("parent", "grid", "tissue"):
        if group[key].shape[0] != n:
            problems.append(f"{name}/{key} has {group[key].shape[0]} rows for {n} patches")
    if problems:
        return problems, n
    parent = group["parent"][()]
    if previous is None:
        if (parent != -1).any():
            problems.append(f"{name}: the first magnification's parents must all be -1")
    else:
        fan = int(group.attrs.get("fan_out", 1))
        expected = np.repeat(np.arange(previous, dtype=np.int64), fan * fan)
        if len(parent) != len(expected) or (parent != expected).any():
            problems.append(f"{name}: children are not {fan}x{fan} per parent, contiguous")
    return problems, n


def validate_bag(path: str | os.PathLike, config: Mapping[str, Any] | None = None) -> list[str]:
    """What is wrong with one of our bag files (an empty list: nothing).

    Parameters
    ----------
    path : path-like
        The file.
    config : mapping, optional
        The configuration a run would write (root attribute ``config``); a file made with
        another configuration is reported as such.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path.name}: file not found"]
    try:
        if not h5py.is_hdf5(path):
            return [f"{path.name}: not an HDF5 file"]
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return [f"{path.name}: not a napari-magnet bag"]
            if int(f.attrs.get("format_version", -1)) != FORMAT_VERSION:
                return [f"{path.name}: format version {f.attrs.get('format_version')}"]
            problems = []
            if config is not None:
                stored = json.loads(str(f.attrs.get("config", "{}")))
                if stored != json.loads(json.dumps(dict(config))):
                    problems.append(f"made with other settings: {stored}")
            previous = None
            for name in [str(v) for v in f.attrs.get("levels", [])] or ["(no levels)"]:
                found, previous = _check_level(f, name, previous)
                problems += found
            return problems
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{path.name}: unreadable ({error})"]


def add_features(
    path: str | os.PathLike,
    features: Mapping[float, np.ndarray],
    encoder: str,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Add (or replace) patch embeddings in one of our bag files, atomically.

    The file is copied to a temporary file beside it, the ``features`` datasets are written
    into the copy, and the copy is renamed onto the file.

    Parameters
    ----------
    path : path-like
        A bag file written by :func:`write_bag`.
    features : mapping
        Target µm per pixel → ``(N, D)`` array (float16 or float32), ``N`` the level's
        patch count, rows in the bag's order.
    encoder : str
        The encoder's name (``features`` attribute ``encoder``, as TRIDENT writes it).
    attrs : mapping, optional
        More ``features`` attributes (e.g. ``config_hash``).
    """
    path = Path(path)
    problems = validate_bag(path)
    if problems:
        raise BagError(path, "; ".join(problems))
    bag = read_bag(path, features=False)
    names = {}
    for mpp, array in features.items():
        level = bag.level(float(mpp))
        array = np.asarray(array)
        if array.ndim != 2 or len(array) != len(level):
            raise ValueError(f"{level.name}: features {array.shape} for {len(level)} patches")
        names[level.name] = array
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            for name, array in names.items():
                group = f[name]
                if "features" in group:
                    del group["features"]
                dset = group.create_dataset("features", data=array)
                dset.attrs["encoder"] = str(encoder)
                dset.attrs["name"] = bag.slide_name
                for key, value in dict(attrs or {}).items():
                    dset.attrs[key] = value
            finest = bag.levels[-1].name
            if "features" in f:
                del f["features"]
            if "features" in f[finest]:
                f["features"] = f[f"{finest}/features"]
    return path
