"""The lazy multiscale pyramid: one dask array per level over a shared chunk cache."""

from __future__ import annotations

import itertools
import math

import dask.array as da
import numpy as np

from .backends import PixelBackend
from .cache import ChunkCache

UNTILED_CHUNK = 512
MIN_CHUNK = 512
_names = itertools.count()


def chunk_size(tile: int) -> int:
    """Chunk side for a native tile side: the smallest multiple of the tile ≥ 512 px.

    Formats without a usable tile grid (no tiles, or strip-like "tiles" of thousands of
    pixels as in NDPI) get 512.
    """
    if tile <= 0 or tile >= 4 * MIN_CHUNK:
        return UNTILED_CHUNK
    return tile * math.ceil(MIN_CHUNK / tile)


class LevelReader:
    """Chunk-aligned, cached reads of one pyramid level (level pixel coordinates)."""

    def __init__(
        self,
        backend: PixelBackend,
        cache: ChunkCache,
        level: int,
        width: int,
        height: int,
        chunk: tuple[int, int],
        key: object,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.level = level
        self.width, self.height = width, height
        self.chunk_w, self.chunk_h = chunk
        self._key = key

    def chunk(self, cy: int, cx: int) -> np.ndarray:
        """Decoded chunk ``(cy, cx)`` of the level grid (edge chunks are cut to the level)."""
        x0, y0 = cx * self.chunk_w, cy * self.chunk_h
        w = min(self.chunk_w, self.width - x0)
        h = min(self.chunk_h, self.height - y0)
        return self.cache.get_or_compute(
            (self._key, self.level, cy, cx),
            lambda: self.backend.read_level(self.level, x0, y0, w, h),
        )

    def window(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``(height, width, 3)`` window inside the level, assembled from cached chunks."""
        if (
            x % self.chunk_w == 0
            and y % self.chunk_h == 0
            and width == min(self.chunk_w, self.width - x)
            and height == min(self.chunk_h, self.height - y)
        ):
            return self.chunk(y // self.chunk_h, x // self.chunk_w)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for cy in range(y // self.chunk_h, (y + height - 1) // self.chunk_h + 1):
            for cx in range(x // self.chunk_w, (x + width - 1) // self.chunk_w + 1):
                block = self.chunk(cy, cx)
                bx0, by0 = cx * self.chunk_w, cy * self.chunk_h
                ox0, oy0 = max(bx0, x), max(by0, y)
                ox1 = min(bx0 + block.shape[1], x + width)
                oy1 = min(by0 + block.shape[0], y + height)
                out[oy0 - y : oy1 - y, ox0 - x : ox1 - x] = block[
                    oy0 - by0 : oy1 - by0, ox0 - bx0 : ox1 - bx0
                ]
        return out

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


class LevelArray(da.Array):
    """A level's dask array whose slices carry only the chunks they touch.

    Computing a slice of a plain ``from_array`` graph makes dask cull the *whole* level's
    graph, which enumerates every chunk key: ~40 ms per read at level 0 of a 100k² slide
    (38,416 chunks), more than decoding the tiles. Slicing a ``LevelArray`` with contiguous
    slices builds a small graph over just the touched chunks, so a read costs what its
    chunks cost. Anything else (steps, fancy indexing, whole-array operations) is plain dask.
    """

    __slots__ = ()

    def __getitem__(self, index):  # noqa: D105
        reader: LevelReader = self._napari_magnet_reader
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) > 3 or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
            return super().__getitem__(index)
        ys = index[0] if len(index) > 0 else slice(None)
        xs = index[1] if len(index) > 1 else slice(None)
        y0, y1, _ = ys.indices(reader.height)
        x0, x1, _ = xs.indices(reader.width)
        if y1 <= y0 or x1 <= x0:
            return super().__getitem__(index)
        cy0, cy1 = y0 // reader.chunk_h, (y1 - 1) // reader.chunk_h + 1
        cx0, cx1 = x0 // reader.chunk_w, (x1 - 1) // reader.chunk_w + 1
        name = f"{self.name}-window-{cy0}-{cy1}-{cx0}-{cx1}"
        graph = {
            (name, i, j, 0): (reader.chunk, cy, cx)
            for i, cy in enumerate(range(cy0, cy1))
            for j, cx in enumerate(range(cx0, cx1))
        }
        heights = tuple(
            min(reader.chunk_h, reader.height - cy * reader.chunk_h) for cy in range(cy0, cy1)
        )
        widths = tuple(
            min(reader.chunk_w, reader.width - cx * reader.chunk_w) for cx in range(cx0, cx1)
        )
        window = da.Array(
            graph,
            name,
            chunks=(heights, widths, (3,)),
            dtype=np.uint8,
            meta=np.empty((0, 0, 0), dtype=np.uint8),
        )
        top, left = cy0 * reader.chunk_h, cx0 * reader.chunk_w
        channels = index[2] if len(index) > 2 else slice(None)
        return window[y0 - top : y1 - top, x0 - left : x1 - left, channels]


def level_arrays(readers: list[LevelReader]) -> list[da.Array]:
    """One dask array per level, chunked on the readers' chunk grid."""
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
