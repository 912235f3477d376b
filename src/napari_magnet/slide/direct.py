"""The direct tile path: compressed tiles read with ``os.pread`` and decoded by tifffile.

OpenSlide stays the reference for correctness; this path only serves pyramid levels whose
pixels tifffile decodes exactly as OpenSlide does, and every vendor quirk that decides that
lives here, in :data:`DIRECT_VENDORS` and :func:`direct_page_problem`. The tests compare
every level served here with OpenSlide's ``read_region`` on the real files in
``../shared/testdata/wsi``.

Why it is faster: OpenSlide composites each tile into a premultiplied ARGB cairo surface that
the caller converts back to RGB; here a tile is read without a shared file position (threads
never serialise on a seek), decoded by imagecodecs, which releases the GIL, and copied into
place. The decoder is the same libjpeg-turbo/zlib family, so the pixels are identical.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import SlideError

#: OpenSlide vendors (``openslide.vendor``) whose levels tifffile may serve, and why.
#:
#: * ``aperio`` (SVS): the levels are tifffile's ``Baseline`` series levels, JPEG tiles in RGB
#:   or YCbCr; identical on CMU-1-Small-Region.svs. JPEG 2000 SVS (compression 33003/33005)
#:   stays on OpenSlide: OpenSlide converts YCbCr J2K with its own integer formula, and no
#:   J2K file here can show imagecodecs' conversion rounds the same way.
#: * ``generic-tiff``: tiled TIFF pyramids, OME-TIFF included: OpenSlide opens an OME-TIFF
#:   as generic-tiff and sees the IFD chain only, so a SubIFD pyramid is one level for it and
#:   the direct path serves that level. Identical on boxes.tiff (float downsamples) and on
#:   generated JPEG and OME-TIFF pyramids.
#: * ``hamamatsu`` (NDPI): tifffile turns the JPEG restart intervals (the McuStarts tag)
#:   into tiles, exactly the tiles OpenSlide decodes, for the levels stored in the file;
#:   identical on hamamatsu_fluorescence_DAPI.ndpi. OpenSlide adds smaller levels of its own
#:   by scaling a stored level while decoding (libjpeg's DCT scaling): those are not in the
#:   file, so they stay on OpenSlide. VMS/VMU (also "hamamatsu") are not TIFF files: tifffile
#:   cannot open them and they stay on OpenSlide.
#:
#: Not here, so OpenSlide reads them:
#:
#: * ``leica`` (SCN): OpenSlide's levels are as large as the whole slide (the collection), with
#:   the main image placed at its offset on that canvas (several main images when their levels
#:   are coplanar) and background elsewhere; tifffile returns each image at its own size, so no
#:   level matches pixel for pixel. No SCN file here either.
#: * ``ventana`` (BIF): level-0 camera frames overlap by the amounts in the XMP TileJointInfo,
#:   and OpenSlide places each frame at its stitched position, in the reduced levels too
#:   (frame by frame inside each stored tile); tifffile returns the stored grid. No BIF file
#:   here to show a level where both agree.
#: * ``philips`` (TIFF): OpenSlide takes the levels from Philips' XML metadata and treats
#:   sparse files' absent areas as background; no Philips file here to verify tifffile against.
#: * ``trestle``: overlapping tiles, placed by OpenSlide as for BIF.
#: * ``mirax``, ``dicom``, ``sakura``, ``synthetic``, ``zeiss``: not TIFF files.
DIRECT_VENDORS = frozenset({"aperio", "generic-tiff", "hamamatsu"})

# Lossless codecs decode to the stored bytes; JPEG goes through libjpeg-turbo on both paths
# (default islow IDCT and fancy upsampling), which gives the same pixels.
DIRECT_COMPRESSIONS = frozenset({1, 5, 7, 8, 32946})
# TIFF photometric values: 2 = RGB, 6 = YCbCr (JPEG only: libjpeg converts it).
RGB, YCBCR, JPEG = 2, 6, 7
# A "tile" larger than this (a whole strip-less JPEG level) is left to OpenSlide.
MAX_TILE_PIXELS = 1 << 22


def direct_page_problem(page) -> str | None:
    """Why tifffile's ``page`` cannot serve a level pixel for pixel like OpenSlide, or None."""
    if not page.is_tiled:
        return "not tiled"
    if page.tilewidth * page.tilelength > MAX_TILE_PIXELS:
        return f"{page.tilewidth}x{page.tilelength} tiles (a whole level per tile)"
    if page.samplesperpixel != 3 or page.planarconfig != 1:
        return f"{page.samplesperpixel} samples, planar configuration {page.planarconfig}"
    if page.bitspersample != 8 or page.sampleformat != 1:
        return f"{page.bitspersample}-bit samples of format {page.sampleformat}"
    if page.compression not in DIRECT_COMPRESSIONS:
        return f"compression {page.compression}"
    if page.photometric != RGB and not (page.photometric == YCBCR and page.compression == JPEG):
        return f"photometric {page.photometric} with compression {page.compression}"
    return None


class TiffTileBackend:
    """Direct tile decoding of the levels whose tifffile page matches OpenSlide's level.

    Parameters
    ----------
    path : Path
        The slide.
    level_dimensions : tuple of (width, height)
        OpenSlide's levels. A level is served when tifffile's first series has a level of the
        same size whose page passes :func:`direct_page_problem`.
    background : tuple of int
        RGB of missing tiles (OpenSlide leaves them transparent, composited on this colour).

    Raises
    ------
    ValueError
        No level can be served.
    """

    name = "tifffile"
    merge_reads = False  # one decode job per tile: they run in parallel

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
            stored = {}
            for series in self._tif.series[0].levels:
                if len(series.pages) == 1:
                    stored.setdefault(tuple(series.shape[:2]), series.keyframe)
            self.pages = {}
            problems = []
            for level, (w, h) in enumerate(level_dimensions):
                page = stored.get((h, w))
                problem = "no stored level of this size" if page is None else None
                problem = problem or direct_page_problem(page)
                if problem is None:
                    self.pages[level] = page
                else:
                    problems.append(f"level {level}: {problem}")
            if not self.pages:
                raise ValueError("; ".join(problems) or "no levels")
            self.problems = tuple(problems)
            # (0, 0) for the levels another backend serves.
            self.tile_sizes = tuple(
                (page.tilewidth, page.tilelength) if page is not None else (0, 0)
                for page in (self.pages.get(lv) for lv in range(len(level_dimensions)))
            )
            self.fd = os.open(str(path), os.O_RDONLY)
        except Exception:
            self._tif.close()
            raise

    def decode_tile(self, page, index: int) -> np.ndarray | None:
        """Tile ``index`` of ``page`` as ``(tile_h, tile_w, 3)`` RGB, or None when missing."""
        count = page.databytecounts[index]
        if count == 0:
            return None
        data = os.pread(self.fd, count, page.dataoffsets[index])
        try:
            tile, _, _ = page.decode(
                data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader
            )
        except Exception as error:  # imagecodecs raises codec-specific types
            raise SlideError(self.path, f"pixels cannot be decoded: {error}") from error
        return tile[0]

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``(height, width, 3)`` RGB of a served ``level``; the window lies inside it."""
        page = self.pages[level]
        tw, th = page.tilewidth, page.tilelength
        tiles_across = -(-page.imagewidth // tw)
        tx0, ty0 = x // tw, y // th
        if (
            x == tx0 * tw
            and y == ty0 * th
            and width == min(tw, page.imagewidth - x)
            and height == min(th, page.imagelength - y)
        ):  # exactly one tile: no copy unless it is cut at the level's edge
            tile = self.decode_tile(page, ty0 * tiles_across + tx0)
            if tile is None:
                return np.broadcast_to(self.background, (height, width, 3)).copy()
            return np.ascontiguousarray(tile[:height, :width])
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(ty0, (y + height - 1) // th + 1):
            for tx in range(tx0, (x + width - 1) // tw + 1):
                tile = self.decode_tile(page, ty * tiles_across + tx)
                oy0, ox0 = max(ty * th, y), max(tx * tw, x)
                oy1, ox1 = min((ty + 1) * th, y + height), min((tx + 1) * tw, x + width)
                target = out[oy0 - y : oy1 - y, ox0 - x : ox1 - x]
                if tile is None:
                    target[...] = self.background
                else:
                    target[...] = tile[oy0 - ty * th : oy1 - ty * th, ox0 - tx * tw : ox1 - tx * tw]
        return out

    def probe(self) -> None:
        """Decode one tile of every served level, so an unsupported codec fails now."""
        for level in self.pages:
            self.read_level(level, 0, 0, 1, 1)

    def close(self) -> None:
        self._tif.close()
        os.close(self.fd)
