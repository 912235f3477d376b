"""A level's JPEG tiles as stand-alone streams, for decoders outside this package.

The direct tile path (:mod:`.direct`) decodes tiles with imagecodecs on the CPU. A GPU
decoder (torchvision's ``decode_jpeg`` on CUDA, nvJPEG) takes whole JPEG files instead: this
module turns a stored tile into one. TIFF keeps the quantisation and Huffman tables once per
page (``JPEGTables``) and each tile as an abbreviated stream; the stream here is the tables
spliced in front of the tile's scan. A tile stored as RGB (TIFF photometric 2, as Aperio
writes it) also gets an Adobe APP14 marker that says "no colour transform", which is how a
JPEG decoder knows not to convert it from YCbCr. Imports neither torch nor napari.

Only levels that the direct path serves, stored as JPEG without tifffile's synthesised
headers (NDPI's restart-interval tiles need them), have a source; every other level is read
through :meth:`Slide.read_level`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .direct import JPEG, RGB, TiffTileBackend

__all__ = ["JpegTileLevel", "jpeg_tile_level"]

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
#: APP14 "Adobe", version 100, no flags, transform 0: the three components are RGB.
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


@dataclass(frozen=True)
class JpegTileLevel:
    """One pyramid level stored as JPEG tiles on a regular grid.

    Attributes
    ----------
    level : int
        The slide's level.
    width, height : int
        The level's size in pixels.
    tile_width, tile_height : int
        The stored tile size (edge tiles are stored whole and cut on use).
    tiles_across : int
        Tiles per row.
    """

    level: int
    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    _backend: TiffTileBackend
    _prefix: bytes

    def tiles(self, x: int, y: int, width: int, height: int) -> list[tuple[int, int, int]]:
        """``(index, tile_x, tile_y)`` of the tiles a window inside the level touches."""
        tw, th = self.tile_width, self.tile_height
        return [
            (ty * self.tiles_across + tx, tx, ty)
            for ty in range(y // th, (y + height - 1) // th + 1)
            for tx in range(x // tw, (x + width - 1) // tw + 1)
        ]

    def stream(self, index: int) -> bytes | None:
        """Tile ``index`` as a complete JPEG file, or None when the file stores no tile there."""
        page = self._backend.pages[self.level]
        count = page.databytecounts[index]
        if count == 0:
            return None
        data = os.pread(self._backend.fd, count, page.dataoffsets[index])
        if not data.startswith(SOI):
            return None
        return self._prefix + data[2:]


def jpeg_tile_level(backend, level: int) -> JpegTileLevel | None:
    """The JPEG tiles of ``level`` when ``backend`` serves it directly from them, else None.

    Parameters
    ----------
    backend : PixelBackend
        The backend that reads ``level`` (only a :class:`~.direct.TiffTileBackend` has tiles).
    level : int
        The slide's level.
    """
    if not isinstance(backend, TiffTileBackend) or level not in backend.pages:
        return None
    page = backend.pages[level]
    if page.compression != JPEG or page.jpegheader is not None:
        return None
    tables = page.jpegtables or b""
    if tables and not (tables.startswith(SOI) and tables.endswith(EOI)):
        return None
    prefix = SOI + (ADOBE_RGB if page.photometric == RGB else b"") + tables[2:-2]
    return JpegTileLevel(
        level=level,
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        tiles_across=-(-int(page.imagewidth) // int(page.tilewidth)),
        _backend=backend,
        _prefix=prefix,
    )
