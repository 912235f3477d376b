"""Pixel backends: one class per format family behind one small interface.

OpenSlide reads every supported format and is the reference for correctness. For the tiled-TIFF
family (SVS, generic tiled TIFF, OME-TIFF) :class:`TiffTileBackend` reads compressed tiles with
``os.pread`` (no shared file position, so threads never serialise on a seek) and decodes them
with tifffile's own decoder (imagecodecs underneath), skipping OpenSlide's RGBA composition.
Vendor quirks (which files take the fast path) are decided in :func:`choose_backend` only.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import openslide

from .errors import SlideError

# Formats whose OpenSlide levels are exactly tifffile's first series levels.
TIFF_FAST_VENDORS = frozenset({"aperio", "generic-tiff"})


class PixelBackend(Protocol):
    """Reads windows of one pyramid level, in that level's pixel coordinates."""

    name: str
    tile_sizes: tuple[tuple[int, int], ...]  # (tile_w, tile_h) per level; (0, 0) when untiled

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Return ``(height, width, 3)`` uint8 RGB; the window lies inside the level."""

    def close(self) -> None:
        """Release file handles."""


def composite_on_background(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Composite OpenSlide's (non-premultiplied) RGBA output on a background colour."""
    alpha = rgba[..., 3:4]
    rgb = rgba[..., :3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.float32) / 255.0
    bg = np.asarray(background, dtype=np.float32)
    out = rgb.astype(np.float32) * a + bg * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class OpenSlideBackend:
    """Every OpenSlide format, through ``read_region``.

    A handle that raised a decode error is closed and reopened on the next read, never
    retried: OpenSlide marks such handles as unusable.
    """

    name = "openslide"

    def __init__(self, path: Path, background: tuple[int, int, int]) -> None:
        self.path = path
        self.background = background
        self._lock = threading.Lock()
        self._handle: openslide.OpenSlide | None = openslide.OpenSlide(str(path))
        self.level_downsamples = tuple(self._handle.level_downsamples)
        props = self._handle.properties
        self.tile_sizes = tuple(
            (
                int(props.get(f"openslide.level[{i}].tile-width", 0)),
                int(props.get(f"openslide.level[{i}].tile-height", 0)),
            )
            for i in range(self._handle.level_count)
        )

    def _osr(self) -> openslide.OpenSlide:
        with self._lock:
            if self._handle is None:
                self._handle = openslide.OpenSlide(str(self.path))
            return self._handle

    def _discard(self, broken: openslide.OpenSlide) -> None:
        with self._lock:
            if self._handle is broken:
                self._handle = None
        try:
            broken.close()
        except Exception:  # noqa: BLE001 - closing a broken handle may fail again
            pass

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        osr = self._osr()
        ds = self.level_downsamples[level]
        # OpenSlide divides the level-0 location by the downsample again; rounding keeps the
        # resulting level offset within half a level-0 pixel of (x, y).
        location = (int(round(x * ds)), int(round(y * ds)))
        try:
            image = osr.read_region(location, level, (width, height))
        except openslide.OpenSlideError as error:
            self._discard(osr)
            raise SlideError(self.path, f"pixels cannot be decoded: {error}") from error
        if image.getchannel("A").getextrema()[0] == 255:  # opaque: PIL drops alpha in C
            return np.asarray(image.convert("RGB"))
        return composite_on_background(np.asarray(image), self.background)

    def close(self) -> None:
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


class TiffTileBackend:
    """Direct tile decoding for tiled TIFF pyramids whose levels match OpenSlide's."""

    name = "tifffile"

    def __init__(
        self,
        path: Path,
        level_dimensions: tuple[tuple[int, int], ...],
        background: tuple[int, int, int],
    ) -> None:
        import tifffile

        self.path = path
        self.background = np.asarray(background, dtype=np.uint8)
        self._tif = tifffile.TiffFile(str(path))
        try:
            levels = self._tif.series[0].levels
            if len(levels) != len(level_dimensions):
                raise ValueError("level count differs from OpenSlide's")
            self._pages = []
            for series, (w, h) in zip(levels, level_dimensions):
                page = series.keyframe
                if series.shape[:2] != (h, w) or not page.is_tiled or page.samplesperpixel < 3:
                    raise ValueError("level geometry differs from OpenSlide's")
                if page.bitspersample != 8 or len(series.pages) != 1:
                    raise ValueError("not an 8-bit single-plane RGB level")
                self._pages.append(page)
            self.tile_sizes = tuple((p.tilewidth, p.tilelength) for p in self._pages)
            self._fd = os.open(str(path), os.O_RDONLY)
        except Exception:
            self._tif.close()
            raise

    def _decode_tile(self, page, index: int) -> np.ndarray | None:
        count = page.databytecounts[index]
        if count == 0:
            return None
        data = os.pread(self._fd, count, page.dataoffsets[index])
        try:
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:  # imagecodecs raises codec-specific types
            raise SlideError(self.path, f"pixels cannot be decoded: {error}") from error
        return tile[0, :, :, :3]

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        tw, th = page.tilewidth, page.tilelength
        tiles_across = -(-page.imagewidth // tw)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(y // th, (y + height - 1) // th + 1):
            for tx in range(x // tw, (x + width - 1) // tw + 1):
                tile = self._decode_tile(page, ty * tiles_across + tx)
                oy0, ox0 = max(ty * th, y), max(tx * tw, x)
                oy1, ox1 = min((ty + 1) * th, y + height), min((tx + 1) * tw, x + width)
                target = out[oy0 - y : oy1 - y, ox0 - x : ox1 - x]
                if tile is None:
                    target[...] = self.background
                else:
                    target[...] = tile[oy0 - ty * th : oy1 - ty * th, ox0 - tx * tw : ox1 - tx * tw]
        return out

    def close(self) -> None:
        self._tif.close()
        os.close(self._fd)


def choose_backend(
    path: Path,
    vendor: str | None,
    level_dimensions: tuple[tuple[int, int], ...],
    background: tuple[int, int, int],
    prefer: str = "auto",
) -> PixelBackend:
    """Pick the fastest backend that reads ``path`` exactly like OpenSlide.

    Parameters
    ----------
    prefer : {"auto", "openslide", "tifffile"}
        ``"auto"`` takes the direct TIFF path for the tiled-TIFF family and OpenSlide
        otherwise; the others force one (``"tifffile"`` raises when it cannot serve the file).
    """
    if prefer not in ("auto", "openslide", "tifffile"):
        raise ValueError(f"unknown backend {prefer!r}; use 'auto', 'openslide' or 'tifffile'")
    if prefer == "tifffile" or (prefer == "auto" and vendor in TIFF_FAST_VENDORS):
        try:
            backend = TiffTileBackend(path, level_dimensions, background)
            backend.read_level(len(level_dimensions) - 1, 0, 0, 1, 1)  # probe the codec
            return backend
        except Exception as error:  # noqa: BLE001 - any mismatch falls back to OpenSlide
            if prefer == "tifffile":
                raise SlideError(path, f"cannot be read tile by tile: {error}") from error
    return OpenSlideBackend(path, background)
