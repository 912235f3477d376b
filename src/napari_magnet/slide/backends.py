"""Pixel backends: one class per format family behind one small interface.

OpenSlide reads every supported format and is the reference for correctness. Levels that
tifffile decodes exactly like OpenSlide (SVS, generic tiled TIFF and OME-TIFF, the stored
levels of NDPI) go through :class:`~.direct.TiffTileBackend` instead, which skips OpenSlide's
ARGB composition; :mod:`.direct` holds every vendor quirk that decides which levels those are.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import openslide

from .direct import DIRECT_VENDORS, TiffTileBackend
from .errors import SlideError


class PixelBackend(Protocol):
    """Reads windows of one pyramid level, in that level's pixel coordinates."""

    name: str
    tile_sizes: tuple[tuple[int, int], ...]  # (tile_w, tile_h) per level; (0, 0) when untiled
    #: True when the backend reads any rectangle at a cost per pixel returned (OpenSlide
    #: composites each one): the pyramid then asks for what a window needs, one rectangle per
    #: row of cache units. False when it decodes whole tiles: each is a parallel job.
    merge_reads: bool

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
    merge_reads = True

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


class LevelBackends:
    """Each level served by its own backend: the direct path where it is exact, else OpenSlide.

    The pyramid reads each level through ``level_backends[level]`` (and its ``merge_reads``).

    Parameters
    ----------
    direct : TiffTileBackend
        Serves the levels in its ``pages``.
    fallback : OpenSlideBackend
        Serves every other level.
    """

    def __init__(self, direct: TiffTileBackend, fallback: OpenSlideBackend) -> None:
        self.direct, self.fallback = direct, fallback
        count = len(fallback.tile_sizes)
        self.level_backends: tuple[PixelBackend, ...] = tuple(
            direct if level in direct.pages else fallback for level in range(count)
        )
        self.tile_sizes = tuple(
            direct.tile_sizes[level] if level in direct.pages else fallback.tile_sizes[level]
            for level in range(count)
        )
        self.name = f"{direct.name}+{fallback.name}"

    @property
    def level_names(self) -> tuple[str, ...]:
        """The backend name of each level."""
        return tuple(b.name for b in self.level_backends)

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self.level_backends[level].read_level(level, x, y, width, height)

    def close(self) -> None:
        try:
            self.direct.close()
        finally:
            self.fallback.close()


def level_backends(backend: PixelBackend, level_count: int) -> tuple[PixelBackend, ...]:
    """The backend that reads each level (the same one for all but a :class:`LevelBackends`)."""
    if isinstance(backend, LevelBackends):
        return backend.level_backends
    return (backend,) * level_count


def choose_backend(
    path: Path,
    vendor: str | None,
    level_dimensions: tuple[tuple[int, int], ...],
    background: tuple[int, int, int],
    prefer: str = "auto",
) -> PixelBackend:
    """Pick, level by level, the fastest backend that reads ``path`` exactly like OpenSlide.

    Parameters
    ----------
    path : Path
        The slide file.
    vendor : str or None
        OpenSlide's ``openslide.vendor``; the direct path is tried for
        :data:`~.direct.DIRECT_VENDORS` only.
    level_dimensions : tuple of (width, height)
        OpenSlide's levels.
    background : tuple of int
        RGB that transparent or missing pixels are composited on.
    prefer : {"auto", "openslide", "tifffile"}
        ``"auto"`` takes the direct path for every level it serves exactly and OpenSlide for
        the others; ``"openslide"`` forces OpenSlide; ``"tifffile"`` forces the direct path
        and raises when it cannot serve every level.

    Returns
    -------
    PixelBackend
        A :class:`~.direct.TiffTileBackend` (every level direct), an
        :class:`OpenSlideBackend`, or a :class:`LevelBackends` mixing both.
    """
    if prefer not in ("auto", "openslide", "tifffile"):
        raise ValueError(f"unknown backend {prefer!r}; use 'auto', 'openslide' or 'tifffile'")
    if prefer == "tifffile" or (prefer == "auto" and vendor in DIRECT_VENDORS):
        direct = None
        try:
            direct = TiffTileBackend(path, level_dimensions, background)
            direct.probe()
            if prefer == "tifffile" and direct.problems:
                raise ValueError("; ".join(direct.problems))
        except Exception as error:  # noqa: BLE001 - any mismatch falls back to OpenSlide
            if direct is not None:
                direct.close()
                direct = None
            if prefer == "tifffile":
                raise SlideError(path, f"cannot be read tile by tile: {error}") from error
        if direct is not None:
            if len(direct.pages) == len(level_dimensions):
                return direct
            return LevelBackends(direct, OpenSlideBackend(path, background))
    return OpenSlideBackend(path, background)
