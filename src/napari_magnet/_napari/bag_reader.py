"""npe2 reader of bag files: each magnification's patch grid as a layer over its slide.

Opening a bag file (``napari-magnet patch`` output, or CLAM's / TRIDENT's coordinate and
feature files) beside its slide shows what a multiple-instance model will see: one layer per
magnification, coarsest at the bottom, named "<slide> · 8 µm/px patches (N)".

* **Placement.** Patches are drawn in world ``(row, col)`` µm at scale 1, like the plugin's
  ROI layers, so they land on the slide layer (which is shown in µm). The pixel size is the
  one our file records (the slide's own, read when the bag was made); for CLAM's and
  TRIDENT's files it is the slide's, when a slide of the same name lies in the bag's folder
  or up to two folders above it (CLAM's ``patches/``, TRIDENT's
  ``<mag>x_…/patches/``), else TRIDENT's ``10 / level0_magnification``, else none: the layers
  are then in level-0 pixels and say so in their metadata.
* **Shapes or Points.** A magnification with at most ``max_shapes`` patches is a Shapes layer
  of rectangles (exact boxes, selectable; the features table holds index, parent, grid and
  tissue fraction). More patches become a Points layer of squares at the patch centres —
  napari draws a hundred thousand points smoothly but not a hundred thousand rectangles.
* **Glass.** Children on glass (tissue fraction 0), which our bags keep so every parent has
  the same number of children, are drawn faint.

The reader declines anything that is not a bag (an HDF5 file without a ``coords`` dataset,
a non-HDF5 file named ``.h5``), so other plugins' readers get those files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..bags import Bag, BagLevel, bag_kind, read_bag
from ..slide import SLIDE_SUFFIXES, SlideError, open_slide
from .layers import KEY

BAG_PATTERNS = (".h5", ".hdf5")
#: Magnifications with more patches than this are drawn as Points.
MAX_SHAPES = 10_000
#: Edge colours of the magnifications, coarsest first (cycled).
LEVEL_COLORS = ((0.0, 0.9, 1.0), (1.0, 0.85, 0.0), (1.0, 0.25, 0.6), (0.45, 1.0, 0.3))
_GLASS_ALPHA = 0.3


def _single(path: str | list[str]) -> str | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return str(path)


def get_bag_reader(path: str | list[str]):
    """npe2 reader hook for bag files.

    Parameters
    ----------
    path : str or list of str
        One path, or a list holding one.

    Returns
    -------
    callable or None
        :func:`read_bag_layers` for one HDF5 bag file (ours, CLAM's or TRIDENT's), else
        ``None``.
    """
    p = _single(path)
    if p is None or not p.lower().endswith(BAG_PATTERNS) or not Path(p).is_file():
        return None
    return read_bag_layers if bag_kind(p) is not None else None


def find_slide(bag_path: Path, names: list[str]) -> Path | None:
    """A slide file called one of ``names`` (with or without suffix) near the bag file."""
    folders = [bag_path.parent, *list(bag_path.parents)[1:3]]
    for folder in folders:
        for name in names:
            if not name:
                continue
            direct = folder / name
            if direct.suffix.lower() in SLIDE_SUFFIXES and direct.is_file():
                return direct
            for suffix in SLIDE_SUFFIXES:
                candidate = folder / f"{name}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def _slide_mpp(path: Path | None) -> tuple[float, float] | None:
    if path is None:
        return None
    try:
        with open_slide(path) as slide:
            return slide.mpp
    except SlideError:
        return None


def _level_features(level: BagLevel) -> dict[str, np.ndarray]:
    n = len(level)
    grid = level.grid if level.grid is not None else np.full((n, 2), -1, dtype=np.int64)
    return {
        "index": np.arange(n, dtype=np.int64),
        "parent": level.parent if level.parent is not None else np.full(n, -1, np.int64),
        "column": grid[:, 0],
        "row": grid[:, 1],
        "tissue": level.tissue if level.tissue is not None else np.full(n, np.nan, np.float32),
    }


def _colors(level: BagLevel, index: int) -> np.ndarray:
    rgb = LEVEL_COLORS[index % len(LEVEL_COLORS)]
    colors = np.tile([*rgb, 1.0], (len(level), 1))
    if level.tissue is not None:
        colors[level.tissue <= 0, 3] = _GLASS_ALPHA
    return colors


def level_layer_data(
    bag: Bag,
    level: BagLevel,
    index: int,
    mpp: tuple[float, float] | None,
    slide_path: Path | None = None,
    max_shapes: int = MAX_SHAPES,
) -> tuple[Any, dict, str]:
    """One magnification as napari layer data (world µm at scale 1, or level-0 pixels).

    Parameters
    ----------
    bag : Bag
        The bag.
    level : BagLevel
        The magnification.
    index : int
        Its position in the bag (colour).
    mpp : (float, float) or None
        µm per level-0 pixel ``(x, y)``; ``None``: world units are level-0 pixels.
    slide_path : Path, optional
        The slide the bag belongs to, recorded in the metadata.
    max_shapes : int
        Above this many patches the layer is a Points layer.

    Returns
    -------
    (data, kwargs, layer_type)
        A napari ``LayerDataTuple``: ``"shapes"`` rectangles or ``"points"`` squares.
    """
    mx, my = mpp if mpp else (1.0, 1.0)
    boxes = level.boxes() * np.array([mx, my, mx, my])  # x0, y0, x1, y1 in world units
    label = f"{level.mpp:g} µm/px" if level.mpp is not None else "patches"
    name = f"{bag.slide_name} · {label} patches ({len(level)})"
    if level.mpp is None:
        name = f"{bag.slide_name} · patches ({len(level)})"
    kind = "shapes" if len(level) <= max_shapes else "points"
    width = max(min(level.extent) * min(mx, my) / 40.0, 1e-6)
    metadata = {
        "path": str(bag.path) if bag.path else None,
        "slide_path": str(slide_path) if slide_path else None,
        "slide_name": bag.slide_name,
        "mpp": tuple(mpp) if mpp else None,
        "slide_dimensions": bag.level0_size,
        KEY: {
            "kind": "bag",
            "source": bag.source,
            "level": level.name,
            "target_mpp": level.mpp,
            "patches": len(level),
            "units": "µm" if mpp else "level-0 pixel",
            "representation": kind,
        },
    }
    kwargs: dict[str, Any] = {
        "name": name,
        "features": _level_features(level),
        "metadata": metadata,
        "opacity": 0.9,
        **({"units": ("µm", "µm")} if mpp else {}),
    }
    colors = _colors(level, index)
    if kind == "shapes":
        y0, x0, y1, x1 = boxes[:, 1], boxes[:, 0], boxes[:, 3], boxes[:, 2]
        rects = np.stack(
            [np.stack([y0, x0], 1), np.stack([y0, x1], 1), np.stack([y1, x1], 1)]
            + [np.stack([y1, x0], 1)],
            axis=1,
        )
        kwargs.update(
            shape_type="rectangle",
            edge_color=colors,
            face_color=[0.0, 0.0, 0.0, 0.0],
            edge_width=width,
        )
        return (list(rects) if len(rects) else [], {**kwargs, "ndim": 2}, "shapes")
    centres = np.stack([(boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2], 1)
    kwargs.update(
        symbol="square",
        size=float(level.extent[0] * mx),
        face_color=[0.0, 0.0, 0.0, 0.0],
        border_color=colors,
        border_width=0.05,
        border_width_is_relative=True,
    )
    return (centres, kwargs, "points")


def read_bag_layers(path: str | list[str], max_shapes: int = MAX_SHAPES) -> list[tuple]:
    """Read a bag file as one layer per magnification, coarsest first (bottom).

    Parameters
    ----------
    path : str or list of str
        The bag file.
    max_shapes : int
        Magnifications with more patches are shown as Points.

    Raises
    ------
    BagError
        The file is not a bag or is damaged (napari shows the message).
    """
    p = Path(_single(path) or "")
    probe = read_bag(p, features=False)
    names = [str(probe.attrs.get("slide_file", "")), probe.slide_name, p.stem]
    if p.stem.endswith("_patches"):
        names.append(p.stem[: -len("_patches")])
    slide_path = find_slide(p, names)
    if probe.source == "napari-magnet":
        mpp = probe.slide_mpp
        bag = probe
    else:  # the slide's own pixel size beats TRIDENT's nominal magnification
        mpp = _slide_mpp(slide_path) or probe.slide_mpp
        bag = read_bag(p, features=False, slide_mpp=mpp) if mpp else probe
    return [
        level_layer_data(bag, level, i, mpp, slide_path, max_shapes)
        for i, level in enumerate(bag.levels)
    ]
