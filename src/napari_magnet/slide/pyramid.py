"""The lazy multiscale pyramid: one dask array per level over a shared cache of decoded units.

Two grids per level:

* **units**, what the cache holds and a decode job makes: the native tile (tiles smaller than
  :data:`UNIT_MIN` grouped), so a viewport decodes little more than the tiles it shows;
* **dask chunks**, what whole-array dask operations compute task by task: a multiple of the
  unit of at least :data:`CHUNK_MIN`, so a level's graph stays small.

A window read (:meth:`LevelReader.window`) takes the cached units under one lock, decodes the
missing ones on the shared pool (:func:`~.parallel.run_all`) while the caller copies the cached
ones, and assembles the window once. Slicing a level's dask array with contiguous slices gives
a :class:`WindowArray`, whose ``np.asarray`` (what napari calls to draw) is exactly that window
read: no scheduler, no per-chunk tasks, no second assembly.

The direct tile path decodes whole tiles, so its units are whole tiles. OpenSlide composites
every pixel it returns, so for its levels a cold window asks OpenSlide for the window's pixels
only (one rectangle per unit row, rows in parallel) and the cache keeps the cut units as
:class:`UnitPart` s; a later window that needs more of such a unit reads the unit whole.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import dask.array as da
import numpy as np

from .backends import PixelBackend
from .cache import ChunkCache
from .parallel import decode_workers, run_all

UNIT_MIN = 128
UNTILED_UNIT = 512
STRIP = 2048  # a tile side at least this long is a strip: never grouped further
CHUNK_MIN = 1024
_names = itertools.count()


def unit_size(tile: int, strips: bool) -> int:
    """Cache-unit side for a native tile side.

    Parameters
    ----------
    tile : int
        Native tile side (0 when the level has no tile grid).
    strips : bool
        True when whole tiles must be decoded (the direct path): a strip-like tile side (an
        NDPI restart interval as wide as the level) is then the unit side; OpenSlide reads
        any rectangle, so it gets :data:`UNTILED_UNIT` there instead.

    Returns
    -------
    int
        The smallest multiple of the tile that is at least :data:`UNIT_MIN` (so units stay
        aligned with the backend's own tiles and parallel reads never share a tile).
    """
    if tile <= 0:
        return UNTILED_UNIT
    if tile >= STRIP:
        return tile if strips else UNTILED_UNIT
    return tile * math.ceil(UNIT_MIN / tile)


def chunk_size(unit: int) -> int:
    """Dask chunk side: the smallest multiple of the unit that is at least :data:`CHUNK_MIN`."""
    return unit * math.ceil(CHUNK_MIN / unit)


class UnitPart:
    """The part of a cache unit a window needed, with its offset in the unit.

    Backends that read any rectangle at a cost per pixel (OpenSlide composites every pixel it
    returns) cache what a window needed rather than whole units: a cold read costs what a
    direct ``read_region`` of the window costs. Counts in the cache by its own bytes.
    """

    __slots__ = ("pixels", "x0", "y0")

    def __init__(self, pixels: np.ndarray, x0: int, y0: int) -> None:
        self.pixels, self.x0, self.y0 = pixels, x0, y0

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes

    def setflags(self, write: bool) -> None:
        self.pixels.setflags(write=write)


def _is_part(value) -> bool:
    return isinstance(value, UnitPart)


class LevelReader:
    """Unit-aligned, cached, parallel reads of one pyramid level (level pixel coordinates).

    Parameters
    ----------
    backend : PixelBackend
        The backend that reads this level.
    cache : ChunkCache
        The slide's cache (shared by every level).
    level, width, height : int
        The level and its size.
    unit : tuple of int
        ``(unit_w, unit_h)``: the cache grid.
    chunk : tuple of int
        ``(chunk_w, chunk_h)``: the dask chunk grid (multiples of the unit).
    key : object
        Distinguishes this slide's cache keys.
    """

    def __init__(
        self,
        backend: PixelBackend,
        cache: ChunkCache,
        level: int,
        width: int,
        height: int,
        unit: tuple[int, int],
        chunk: tuple[int, int],
        key: object,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.level = level
        self.width, self.height = width, height
        self.unit_w, self.unit_h = unit
        self.chunk_w, self.chunk_h = chunk
        self._key = key
        self._merge = bool(getattr(backend, "merge_reads", False))

    def _unit_box(self, uy: int, ux: int) -> tuple[int, int, int, int]:
        x0, y0 = ux * self.unit_w, uy * self.unit_h
        return x0, y0, min(self.unit_w, self.width - x0), min(self.unit_h, self.height - y0)

    def unit(self, uy: int, ux: int) -> np.ndarray:
        """Decoded unit ``(uy, ux)`` (read-only; edge units are cut to the level)."""
        x0, y0, w, h = self._unit_box(uy, ux)
        return self.cache.get_or_compute(
            (self._key, self.level, uy, ux),
            lambda: self.backend.read_level(self.level, x0, y0, w, h),
        )

    def chunk(self, cy: int, cx: int) -> np.ndarray:
        """Dask chunk ``(cy, cx)`` of the level grid (edge chunks are cut to the level)."""
        x0, y0 = cx * self.chunk_w, cy * self.chunk_h
        return self.window(
            x0, y0, min(self.chunk_w, self.width - x0), min(self.chunk_h, self.height - y0)
        )

    def window(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``(height, width, 3)`` window inside the level.

        A window inside one cached unit is a read-only view of it; any other is a new array
        assembled from the units, the missing ones read in parallel (see :meth:`_runs`).
        """
        uw, uh = self.unit_w, self.unit_h
        key, level = self._key, self.level
        wanted = [
            (uy, ux)
            for uy in range(y // uh, (y + height - 1) // uh + 1)
            for ux in range(x // uw, (x + width - 1) // uw + 1)
        ]
        found = self.cache.get_many((key, level, uy, ux) for uy, ux in wanted)
        cached, missing, partial = [], [], set()
        for uy, ux in wanted:
            value = found.get((key, level, uy, ux))
            if isinstance(value, UnitPart):
                bx, by = ux * uw + value.x0, uy * uh + value.y0
                ph, pw = value.pixels.shape[:2]
                # What the window needs of this unit: inside the part, or read the whole unit.
                nx0, ny0 = max(x, ux * uw), max(y, uy * uh)
                nx1, ny1 = min(x + width, (ux + 1) * uw), min(y + height, (uy + 1) * uh)
                if bx <= nx0 and by <= ny0 and nx1 <= bx + pw and ny1 <= by + ph:
                    value = value.pixels
                else:
                    partial.add((uy, ux))
                    value = None
            else:
                bx, by = ux * uw, uy * uh
            if value is None:
                missing.append((uy, ux))
            else:
                cached.append((value, bx, by))
        if len(wanted) == 1 and not missing:
            block, bx, by = cached[0]
            if (bx, by) == (x, y) and block.shape[:2] == (height, width):
                return block
            return block[y - by : y - by + height, x - bx : x - bx + width]
        if len(wanted) == 1 and not self._merge:
            block = self.unit(*missing[0])
            bx, by = missing[0][1] * uw, missing[0][0] * uh
            return block[y - by : y - by + height, x - bx : x - bx + width]
        out = np.empty((height, width, 3), dtype=np.uint8)

        def place(block: np.ndarray, bx: int, by: int) -> None:
            ox0, oy0 = max(bx, x), max(by, y)
            ox1 = min(bx + block.shape[1], x + width)
            oy1 = min(by + block.shape[0], y + height)
            out[oy0 - y : oy1 - y, ox0 - x : ox1 - x] = block[
                oy0 - by : oy1 - by, ox0 - bx : ox1 - bx
            ]

        def copier(blocks: list) -> Callable[[], None]:
            def copy_cached() -> None:
                for block, bx, by in blocks:
                    place(block, bx, by)

            return copy_cached

        # Copies release the GIL too: the cached units are copied by several threads at once.
        share = max(math.ceil(len(cached) / (decode_workers() + 1)), 4)
        jobs = [copier(cached[i : i + share]) for i in range(0, len(cached), share)]
        if self._merge:
            window = (x, y, x + width, y + height)
            for run in self._runs(missing, partial, window):
                jobs.append(self._run_job(run, place))
        else:
            jobs += [self._unit_job(uy, ux, place) for uy, ux in missing]
        run_all(jobs)
        return out

    def _unit_job(self, uy: int, ux: int, place):
        def job() -> None:
            place(self.unit(uy, ux), ux * self.unit_w, uy * self.unit_h)

        return job

    def _runs(self, missing, partial, window) -> list[tuple[int, int, int, int, int]]:
        """Rectangles to read, ``(uy, x0, y0, x1, y1)``: each spans a run of missing units
        along one unit row, cut so that every worker gets one.

        A missing unit contributes only what the window needs of it, so a cold read asks the
        backend for the window's pixels and no more; a unit cached in part, and needed beyond
        that part, is read whole (panning then completes units instead of cutting new parts).
        """
        if not missing:
            return []
        wx0, wy0, wx1, wy1 = window
        longest = max(1, math.ceil(len(missing) / max(decode_workers(), 1)))
        runs: list[list[int]] = []
        for uy, ux in missing:  # row-major order
            ux0, uy0, w, h = self._unit_box(uy, ux)
            if (uy, ux) in partial:
                box = [ux0, uy0, ux0 + w, uy0 + h]
            else:
                box = [max(ux0, wx0), max(uy0, wy0), min(ux0 + w, wx1), min(uy0 + h, wy1)]
            last = runs[-1] if runs else None
            if last and last[0] == uy and last[3] == box[0] and last[5] < longest:
                last[3] = box[2]
                last[2], last[4] = min(last[2], box[1]), max(last[4], box[3])
                last[5] += 1
            else:
                runs.append([uy, box[0], box[1], box[2], box[3], 1])
        return [(uy, x0, y0, x1, y1) for uy, x0, y0, x1, y1, _ in runs]

    def _run_job(self, run: tuple[int, int, int, int, int], place):
        """One backend read of a run's rectangle, kept in the cache unit by unit."""
        uy, x0, y0, x1, y1 = run

        def job() -> None:
            strip = self.backend.read_level(self.level, x0, y0, x1 - x0, y1 - y0)
            place(strip, x0, y0)
            uw = self.unit_w
            for ux in range(x0 // uw, (x1 - 1) // uw + 1):
                bx, by, w, h = self._unit_box(uy, ux)
                px0, px1 = max(bx, x0), min(bx + w, x1)
                if (px0, px1, y0, y1) == (x0, x1, y0, y1):
                    pixels = strip  # the strip is this unit's piece: no copy
                else:  # a copy of its own: a view would keep the whole strip alive
                    pixels = strip[:, px0 - x0 : px1 - x0].copy()
                if (px0, px1, y0, y1) == (bx, bx + w, by, by + h):
                    self.cache.put((self._key, self.level, uy, ux), pixels, replace=True)
                else:  # a part never displaces a whole unit another thread just stored
                    part = UnitPart(pixels, px0 - bx, y0 - by)
                    self.cache.put((self._key, self.level, uy, ux), part, replace=_is_part)

        return job

    # The array protocol dask.array.from_array needs.
    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        ys, xs = index[0], index[1]
        y0, y1, _ = ys.indices(self.height)
        x0, x1, _ = xs.indices(self.width)
        block = self.window(x0, y0, x1 - x0, y1 - y0)
        return block[(slice(None), slice(None)) + tuple(index[2:])]


def _contiguous(index, shape: tuple[int, ...]):
    """``((y0, y1), (x0, x1), channels)`` for an index of step-1 slices, else None."""
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > 3 or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
        return None
    index = index + (slice(None),) * (3 - len(index))
    y0, y1, _ = index[0].indices(shape[0])
    x0, x1, _ = index[1].indices(shape[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return (y0, y1), (x0, x1), index[2]


def _read_window(reader: LevelReader, x: int, y: int, w: int, h: int, channels) -> np.ndarray:
    """One task of a window's graph: a window read, then the channel selection."""
    block = reader.window(x, y, w, h)
    return block if channels == slice(None) else block[:, :, channels]


def _cuts(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut on the multiples of ``step``."""
    edges = [start, *range((start // step + 1) * step, stop, step), stop]
    return list(zip(edges[:-1], edges[1:]))


def _window_array(level: str, reader: LevelReader, x0, y0, x1, y1, channels) -> WindowArray:
    """The dask array of the window ``[y0:y1, x0:x1, channels]`` of the level named ``level``.

    Its graph holds one task per dask chunk the window touches (the part of the chunk inside
    the window), built directly rather than by slicing: a viewport's array costs tens of
    microseconds to make.
    """
    rows, cols = _cuts(y0, y1, reader.chunk_h), _cuts(x0, x1, reader.chunk_w)
    depth = len(range(3)[channels])
    name = f"{level}-window-{x0}-{y0}-{x1}-{y1}-{channels.start}-{channels.stop}-{channels.step}"
    graph = {
        (name, i, j, 0): (_read_window, reader, a, b, c - a, d - b, channels)
        for i, (b, d) in enumerate(rows)
        for j, (a, c) in enumerate(cols)
    }
    window = WindowArray(
        graph,
        name,
        chunks=(tuple(d - b for b, d in rows), tuple(c - a for a, c in cols), (depth,)),
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
    )
    window._napari_magnet_window = (level, reader, x0, y0, x1 - x0, y1 - y0, channels)
    return window


class LevelArray(da.Array):
    """A level's dask array whose contiguous slices are :class:`WindowArray` s.

    Computing a slice of a plain ``from_array`` graph makes dask cull the *whole* level's
    graph (every chunk key of the level, tens of milliseconds on a large slide). A contiguous
    slice of a ``LevelArray`` carries the touched chunks only, and materialising it with
    ``np.asarray`` reads the window directly. Anything else (steps, fancy indexing,
    whole-array operations) is plain dask.
    """

    __slots__ = ()

    def __getitem__(self, index):  # noqa: D105
        found = _contiguous(index, self.shape)
        if found is None:
            return super().__getitem__(index)
        (y0, y1), (x0, x1), channels = found
        reader: LevelReader = self._napari_magnet_reader
        return _window_array(self.name, reader, x0, y0, x1, y1, channels)

    def __array__(self, dtype=None, copy=None):  # noqa: D105
        return self[:, :, :].__array__(dtype=dtype, copy=copy)


class WindowArray(da.Array):
    """A window of a level: a dask array whose ``np.asarray`` is one direct window read.

    ``compute()`` and every dask operation run its per-chunk graph as usual; ``np.asarray``
    (what napari calls for the region it draws) skips the scheduler and reads the window
    through :meth:`LevelReader.window` once: the units come from the cache or decode in
    parallel, and the window is assembled once, with no per-chunk task results to copy again.
    Contiguous slices of it are windows again.
    """

    __slots__ = ()

    def __array__(self, dtype=None, copy=None):  # noqa: D105
        _, reader, x, y, w, h, channels = self._napari_magnet_window
        data = reader.window(x, y, w, h)
        if channels != slice(None):
            data = data[:, :, channels]
        if dtype is not None and np.dtype(dtype) != data.dtype:
            return data.astype(dtype)
        if copy:
            return data.copy()
        return data

    def __getitem__(self, index):  # noqa: D105
        level, reader, x, y, w, h, channels = self._napari_magnet_window
        found = _contiguous(index, self.shape)
        if found is None or channels != slice(None):
            return super().__getitem__(index)
        (y0, y1), (x0, x1), inner = found
        if (y0, y1, x0, x1) == (0, h, 0, w) and inner == slice(None):
            return self
        return _window_array(level, reader, x + x0, y + y0, x + x1, y + y1, inner)


def level_arrays(readers: list[LevelReader]) -> list[da.Array]:
    """One dask array per level, chunked on the readers' dask chunk grid."""
    arrays = []
    token = next(_names)
    for reader in readers:
        array = da.from_array(
            reader,
            chunks=(reader.chunk_h, reader.chunk_w, 3),
            name=f"napari-magnet-{token}-level{reader.level}",
            asarray=False,
            fancy=False,
            lock=False,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )
        array.__class__ = LevelArray
        array._napari_magnet_reader = reader
        arrays.append(array)
    return arrays
