"""Attention maps as OME-TIFF that overlay the slide again when reopened (DESIGN §2, §8).

An attention map is a 2-D float array covering a level-0 box ``(x0, y0, x1, y1)`` (pixels,
x right, y down) of a slide: map pixel ``(i, j)`` (row, column) covers level-0
``[x0 + j·sx, x0 + (j+1)·sx) × [y0 + i·sy, y0 + (i+1)·sy)`` with ``sx = (x1-x0)/W`` and
``sy = (y1-y0)/H``.

The file stores that placement three ways, so any reader can find it:

* OME ``Pixels`` ``PhysicalSizeX/Y`` — the map's own pixel size: ``sx·mpp_x`` µm (unit
  ``µm``), or ``sx`` level-0 pixels (unit ``pixel``) for a slide without mpp;
* OME ``Plane`` ``PositionX/Y`` — the level-0 offset of the map's top-left corner,
  ``x0·mpp_x`` µm (or ``x0`` in unit ``pixel``);
* exact numbers for us: a ``MapAnnotation`` in namespace :data:`NAMESPACE` (keys ``x0``, ``y0``,
  ``x1``, ``y1``, ``mpp_x``, ``mpp_y``, ``name``, ``version``) and the same as JSON in the OME
  ``Image/Description``. TIFF ``XResolution``/``YResolution`` (pixels per cm) carry the
  physical pixel size for non-OME readers.

:func:`read_attention_ome_tiff` prefers the MapAnnotation, then the JSON description, then the
OME physical sizes and plane positions (unit ``pixel``, or µm with ``slide_mpp`` given).
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .atomic import atomic_path

__all__ = [
    "AttentionMap",
    "AttentionMapError",
    "NAMESPACE",
    "read_attention_ome_tiff",
    "write_attention_ome_tiff",
]

#: Namespace of our MapAnnotation and marker of our JSON description.
NAMESPACE = "napari-magnet/attention-map"
_VERSION = 1

_TO_UM = {
    "µm": 1.0,  # U+00B5 MICRO SIGN, OME's spelling
    "μm": 1.0,  # U+03BC GREEK SMALL LETTER MU
    "um": 1.0,
    "micron": 1.0,
    "nm": 1e-3,
    "pm": 1e-6,
    "Å": 1e-4,
    "mm": 1e3,
    "cm": 1e4,
    "dm": 1e5,
    "m": 1e6,
}


class AttentionMapError(ValueError):
    """An attention-map file that cannot be written or read; the message names the file."""


@dataclass
class AttentionMap:
    """An attention map and where it lies on the slide.

    Attributes
    ----------
    array : np.ndarray
        ``(H, W)`` float32 map.
    box : (x0, y0, x1, y1)
        Level-0 pixel box the map covers.
    mpp : (mpp_x, mpp_y) or None
        The slide's level-0 µm per pixel, ``None`` when unknown.
    name : str
        Display name.

    Notes
    -----
    napari places data index *centres* at ``translate + index·scale``; to overlay the map on a
    slide shown in µm use ``scale = (sy·mpp_y, sx·mpp_x)`` and
    ``translate = ((y0 + sy/2)·mpp_y, (x0 + sx/2)·mpp_x)`` (see :meth:`pixel_to_level0`).
    """

    array: np.ndarray
    box: tuple[float, float, float, float]
    mpp: tuple[float, float] | None = None
    name: str = ""

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape[:2])  # type: ignore[return-value]

    @property
    def pixel_size(self) -> tuple[float, float]:
        """``(sx, sy)``: level-0 pixels per map pixel along x and y."""
        x0, y0, x1, y1 = self.box
        h, w = self.shape
        return ((x1 - x0) / w, (y1 - y0) / h)

    @property
    def physical_pixel_size(self) -> tuple[float, float] | None:
        """``(µm, µm)`` per map pixel along x and y, or ``None`` without mpp."""
        if self.mpp is None:
            return None
        sx, sy = self.pixel_size
        return (sx * self.mpp[0], sy * self.mpp[1])

    def pixel_to_level0(
        self, row: Any, col: Any, *, center: bool = True
    ) -> tuple[np.ndarray, np.ndarray] | tuple[float, float]:
        """Level-0 position of map pixels.

        Parameters
        ----------
        row, col : int, float or array
            Map pixel indices (scalars or arrays).
        center : bool
            The pixel's centre; ``False``: its top-left corner.

        Returns
        -------
        (x, y)
            Level-0 floats, or arrays for array input.
        """
        sx, sy = self.pixel_size
        off = 0.5 if center else 0.0
        x = self.box[0] + (np.asarray(col, dtype=float) + off) * sx
        y = self.box[1] + (np.asarray(row, dtype=float) + off) * sy
        if np.ndim(x) == 0 and np.ndim(y) == 0:
            return (float(x), float(y))
        return (x, y)

    def level0_to_pixel(self, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray] | tuple[int, int]:
        """The map pixel containing level-0 points.

        Parameters
        ----------
        x, y : float or array
            Level-0 positions.

        Returns
        -------
        (row, col)
            Integer indices, or arrays for array input; they may lie outside the map (compare
            with :attr:`shape`).
        """
        sx, sy = self.pixel_size
        col = np.floor((np.asarray(x, dtype=float) - self.box[0]) / sx).astype(int)
        row = np.floor((np.asarray(y, dtype=float) - self.box[1]) / sy).astype(int)
        if np.ndim(row) == 0 and np.ndim(col) == 0:
            return (int(row), int(col))
        return (row, col)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _check_box(box: Any, what: str) -> tuple[float, float, float, float]:
    try:
        b = tuple(float(v) for v in np.asarray(box, dtype=float).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise AttentionMapError(f"{what}: box {box!r} is not 4 numbers") from exc
    if len(b) != 4 or not all(math.isfinite(v) for v in b) or b[2] <= b[0] or b[3] <= b[1]:
        raise AttentionMapError(
            f"{what}: box {box!r} is not a finite (x0, y0, x1, y1) with x1 > x0, y1 > y0"
        )
    return b  # type: ignore[return-value]


def _check_mpp(mpp: Any, what: str) -> tuple[float, float] | None:
    if mpp is None:
        return None
    try:
        m = tuple(float(v) for v in np.asarray(mpp, dtype=float).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise AttentionMapError(f"{what}: mpp {mpp!r} is not two numbers") from exc
    if len(m) == 1:
        m = (m[0], m[0])
    if len(m) != 2 or not all(math.isfinite(v) and v > 0 for v in m):
        raise AttentionMapError(f"{what}: mpp {mpp!r} is not two positive numbers")
    return m  # type: ignore[return-value]


def write_attention_ome_tiff(
    path: str | os.PathLike,
    attention: np.ndarray,
    box: tuple[float, float, float, float],
    mpp: tuple[float, float] | None,
    name: str = "attention",
) -> Path:
    """Write an attention map as a single-plane float32 OME-TIFF, atomically.

    Parameters
    ----------
    path : path-like
        Output file, conventionally ``*.ome.tif``.
    attention : np.ndarray
        ``(H, W)`` map (cast to float32).
    box : (x0, y0, x1, y1)
        Level-0 pixel box the map covers.
    mpp : (mpp_x, mpp_y) or None
        The slide's level-0 µm per pixel; ``None`` writes sizes in unit ``pixel`` (level-0).
    name : str
        OME Image name.

    Returns the path. Raises :class:`AttentionMapError` for a bad array, box or mpp.
    """
    what = str(path)
    arr = np.asarray(attention)
    if arr.ndim == 3 and 1 in arr.shape[:1]:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise AttentionMapError(f"{what}: attention must be a non-empty 2-D array, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise AttentionMapError(f"{what}: attention must be numeric, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    b = _check_box(box, what)
    m = _check_mpp(mpp, what)
    h, w = arr.shape
    sx, sy = (b[2] - b[0]) / w, (b[3] - b[1]) / h

    if m is not None:
        unit = "µm"
        phys = (sx * m[0], sy * m[1])
        pos = (b[0] * m[0], b[1] * m[1])
    else:
        unit = "pixel"
        phys = (sx, sy)
        pos = (b[0], b[1])

    info = {
        "namespace": NAMESPACE,
        "version": _VERSION,
        "name": str(name),
        "box_level0": list(b),
        "mpp": list(m) if m is not None else None,
        "shape": [h, w],
        "pixel_size_level0": [sx, sy],
    }
    mapping = {
        "version": str(_VERSION),
        "name": str(name),
        "x0": repr(b[0]),
        "y0": repr(b[1]),
        "x1": repr(b[2]),
        "y1": repr(b[3]),
        "mpp_x": repr(m[0]) if m is not None else "",
        "mpp_y": repr(m[1]) if m is not None else "",
    }
    metadata = {
        "axes": "YX",
        "Name": str(name),
        "Description": json.dumps(info, ensure_ascii=False),
        "PhysicalSizeX": phys[0],
        "PhysicalSizeXUnit": unit,
        "PhysicalSizeY": phys[1],
        "PhysicalSizeYUnit": unit,
        "Plane": {
            "PositionX": [pos[0]],
            "PositionXUnit": [unit],
            "PositionY": [pos[1]],
            "PositionYUnit": [unit],
        },
        "MapAnnotation": {"Namespace": NAMESPACE, "Value": mapping},
    }
    kwargs: dict[str, Any] = {}
    if m is not None:
        # TIFF resolution tags (pixels per centimetre) for readers that ignore OME-XML
        kwargs["resolution"] = (1e4 / phys[0], 1e4 / phys[1])
        kwargs["resolutionunit"] = "CENTIMETER"
    if h > 1024 or w > 1024:
        kwargs["tile"] = (256, 256)
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp,
            arr,
            ome=True,
            photometric="minisblack",
            compression="zlib",
            metadata=metadata,
            software="napari-magnet",
            **kwargs,
        )
    return Path(path)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _parse_ome(xml: str) -> dict[str, Any]:
    root = ET.fromstring(xml)
    image = next((e for e in root.iter() if _local(e.tag) == "Image"), None)
    if image is None:
        return {}
    out: dict[str, Any] = {"name": image.get("Name", "")}
    for child in image:
        if _local(child.tag) == "Description" and child.text:
            out["description"] = child.text
        elif _local(child.tag) == "Pixels":
            out["pixels"] = dict(child.attrib)
            plane = next((p for p in child if _local(p.tag) == "Plane"), None)
            if plane is not None:
                out["plane"] = dict(plane.attrib)
    for ann in root.iter():
        if _local(ann.tag) == "MapAnnotation" and ann.get("Namespace") == NAMESPACE:
            values: dict[str, str] = {}
            for m in ann.iter():
                if _local(m.tag) == "M" and m.get("K") is not None:
                    values[m.get("K")] = m.text or ""
            out["map"] = values
            break
    return out


def _from_map(values: dict[str, str]) -> tuple[tuple, tuple | None, str] | None:
    box = tuple(_float(values.get(k)) for k in ("x0", "y0", "x1", "y1"))
    if any(v is None for v in box):
        return None
    mx, my = _float(values.get("mpp_x")), _float(values.get("mpp_y"))
    mpp = (mx, my) if mx is not None and my is not None else None
    return box, mpp, values.get("name", "")


def _from_description(text: str) -> tuple[tuple, tuple | None, str] | None:
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or info.get("namespace") != NAMESPACE:
        return None
    box = info.get("box_level0")
    if not isinstance(box, list) or len(box) != 4:
        return None
    box = tuple(_float(v) for v in box)
    if any(v is None for v in box):
        return None
    mpp = info.get("mpp")
    if isinstance(mpp, list) and len(mpp) == 2 and all(_float(v) for v in mpp):
        mpp = (float(mpp[0]), float(mpp[1]))
    else:
        mpp = None
    return box, mpp, str(info.get("name", ""))


def _from_physical(
    ome: dict, shape: tuple[int, int], slide_mpp: tuple[float, float] | None
) -> tuple[tuple, tuple | None] | None:
    px = ome.get("pixels", {})
    plane = ome.get("plane", {})
    h, w = shape
    sizes, offsets = [], []
    for axis in ("X", "Y"):
        size = _float(px.get(f"PhysicalSize{axis}"))
        unit = px.get(f"PhysicalSize{axis}Unit", "µm")  # OME's default unit is µm
        pos = _float(plane.get(f"Position{axis}", 0.0))
        pos_unit = plane.get(f"Position{axis}Unit", "reference frame")
        if size is None or pos is None:
            return None
        sizes.append((size, unit))
        offsets.append((pos, pos_unit if f"Position{axis}" in plane else unit))
    if all(u == "pixel" for _, u in sizes + offsets):
        sx, sy = sizes[0][0], sizes[1][0]
        x0, y0 = offsets[0][0], offsets[1][0]
        return (x0, y0, x0 + sx * w, y0 + sy * h), None
    if slide_mpp is None or not all(u in _TO_UM for _, u in sizes + offsets):
        return None
    mx, my = slide_mpp
    sx = sizes[0][0] * _TO_UM[sizes[0][1]] / mx
    sy = sizes[1][0] * _TO_UM[sizes[1][1]] / my
    x0 = offsets[0][0] * _TO_UM[offsets[0][1]] / mx
    y0 = offsets[1][0] * _TO_UM[offsets[1][1]] / my
    return (x0, y0, x0 + sx * w, y0 + sy * h), (mx, my)


def read_attention_ome_tiff(
    path: str | os.PathLike, *, slide_mpp: tuple[float, float] | None = None
) -> AttentionMap:
    """Read an attention map written by :func:`write_attention_ome_tiff` (or another 2-D
    OME-TIFF whose placement is given by OME physical sizes and plane positions in unit
    ``pixel``, or in length units together with ``slide_mpp``).

    Parameters
    ----------
    path : path-like
        The file.
    slide_mpp : (mpp_x, mpp_y), optional
        The slide's µm per pixel, for files placed in length units.

    Returns
    -------
    AttentionMap
        The map, its level-0 box and the slide's mpp when recorded.

    Raises
    ------
    AttentionMapError
        Naming the file when it cannot be read, is not a 2-D image, or says nothing about
        where it lies on the slide.
    """
    what = str(path)
    try:
        with tifffile.TiffFile(path) as tf:
            if not tf.series:
                raise AttentionMapError(f"{what}: no image in the file")
            array = tf.series[0].asarray()
            ome_xml = tf.ome_metadata if tf.is_ome else None
            description = tf.pages.first.description if len(tf.pages) else ""
    except AttentionMapError:
        raise
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise AttentionMapError(f"{what}: cannot read as TIFF: {exc}") from None

    array = np.squeeze(array)
    if array.ndim != 2:
        raise AttentionMapError(f"{what}: expected a 2-D map, got shape {array.shape}")
    array = np.asarray(array, dtype=np.float32)
    shape = array.shape

    ome: dict[str, Any] = {}
    if ome_xml:
        try:
            ome = _parse_ome(ome_xml)
        except ET.ParseError as exc:
            raise AttentionMapError(f"{what}: malformed OME-XML: {exc}") from None

    found = None
    if "map" in ome:
        found = _from_map(ome["map"])
    if found is None and "description" in ome:
        found = _from_description(ome["description"])
    if found is None and description and not ome_xml:
        found = _from_description(description)
    if found is not None:
        box, mpp, name = found
        name = name or ome.get("name", "")
    else:
        placed = _from_physical(ome, shape, _check_mpp(slide_mpp, what)) if ome else None
        if placed is None:
            raise AttentionMapError(
                f"{what}: no level-0 placement: neither napari-magnet metadata nor OME "
                "physical sizes/positions in 'pixel' units (pass slide_mpp for µm)"
            )
        box, mpp = placed
        name = ome.get("name", "")
    box = _check_box(box, what)
    return AttentionMap(array=array, box=box, mpp=mpp, name=str(name))
