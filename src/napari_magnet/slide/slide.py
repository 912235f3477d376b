"""``open_slide`` and the :class:`Slide` every other module reads through."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path

import dask.array as da
import numpy as np
import openslide

from .backends import PixelBackend, choose_backend, composite_on_background, level_backends
from .cache import ChunkCache, default_cache_bytes
from .errors import SlideError
from .geometry import SlideGeometry
from .jpeg_tiles import JpegTileLevel, jpeg_tile_level
from .pyramid import LevelReader, chunk_size, level_arrays, unit_size

SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)


def resolve_slide_path(path: str | Path) -> Path:
    """The file OpenSlide should open for ``path``; a folder of DICOM files → one of them."""
    path = Path(path).expanduser()
    if path.is_dir():
        dicoms = sorted(p for p in path.iterdir() if p.suffix.lower() == ".dcm")
        if not dicoms:
            raise SlideError(path, "folder holds no DICOM (.dcm) files")
        return dicoms[0]
    return path


def is_slide(path: str | Path) -> bool:
    """True when OpenSlide recognises ``path`` (a file or a DICOM folder) as a slide format."""
    try:
        target = resolve_slide_path(path)
    except SlideError:
        return False
    if not target.is_file():
        return False
    try:
        return openslide.OpenSlide.detect_format(str(target)) is not None
    except Exception:  # noqa: BLE001 - detection must never raise
        return False


class _AssociatedImages(Mapping):
    """Label, macro, thumbnail… decoded to RGB arrays only when asked for."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self._path = path
        self._names = names

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        with openslide.OpenSlide(str(self._path)) as osr:
            return composite_on_background(np.asarray(osr.associated_images[name]), (255, 255, 255))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class Slide:
    """A whole-slide image: metadata, exact geometry, region reads and a lazy pyramid.

    Use :func:`open_slide` to create one. Coordinates are level-0 pixels ``(x, y)``.
    """

    def __init__(
        self, path: str | Path, cache_bytes: int | None = None, backend: str = "auto"
    ) -> None:
        self.requested_path = Path(path).expanduser()
        self.path = resolve_slide_path(self.requested_path)
        if not self.path.exists():
            raise SlideError(self.path, "file not found")
        if openslide.OpenSlide.detect_format(str(self.path)) is None:
            raise SlideError(self.path, "not a slide: OpenSlide does not recognise its format")
        try:
            osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideError(self.path, f"OpenSlide cannot open it: {error}") from error
        with osr:
            self.properties: dict[str, str] = dict(osr.properties)
            self.geometry = SlideGeometry(
                tuple(tuple(int(v) for v in d) for d in osr.level_dimensions),
                tuple(float(d) for d in osr.level_downsamples),
            )
            associated = list(osr.associated_images)
        self.associated_images: Mapping[str, np.ndarray] = _AssociatedImages(self.path, associated)
        self.cache = ChunkCache(default_cache_bytes() if cache_bytes is None else cache_bytes)
        self._backend: PixelBackend = choose_backend(
            self.path, self.vendor, self.level_dimensions, self.background, prefer=backend
        )
        per_level = level_backends(self._backend, self.level_count)
        self._readers = []
        for level, ((w, h), (tw, th)) in enumerate(
            zip(self.level_dimensions, self._backend.tile_sizes)
        ):
            strips = not per_level[level].merge_reads  # whole tiles only: strips stay whole
            unit = (unit_size(tw, strips), unit_size(th, strips))
            self._readers.append(
                LevelReader(
                    per_level[level],
                    self.cache,
                    level,
                    w,
                    h,
                    unit,
                    (chunk_size(unit[0]), chunk_size(unit[1])),
                    key=id(self),
                )
            )
        self._probe()

    def _probe(self) -> None:
        """Decode one chunk of the smallest level, so undecodable slides fail at open."""
        top = self._readers[-1]
        try:
            top.window(0, 0, min(top.width, 16), min(top.height, 16))
        except SlideError:
            self.close()
            raise

    # -- metadata ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.requested_path.stem

    @property
    def vendor(self) -> str | None:
        return self.properties.get("openslide.vendor")

    @property
    def backend_name(self) -> str:
        """``"tifffile"``, ``"openslide"``, or ``"tifffile+openslide"`` when levels differ."""
        return self._backend.name

    @property
    def level_backends(self) -> tuple[str, ...]:
        """The backend that reads each level (see :mod:`napari_magnet.slide.direct`)."""
        return tuple(r.backend.name for r in self._readers)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.geometry.dimensions

    @property
    def level_count(self) -> int:
        return self.geometry.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self.geometry.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self.geometry.level_downsamples

    @property
    def tile_sizes(self) -> tuple[tuple[int, int], ...]:
        return self._backend.tile_sizes

    @cached_property
    def mpp(self) -> tuple[float, float] | None:
        """``(mpp_x, mpp_y)`` in µm per level-0 pixel, or None when the file has none."""
        try:
            mpp_x = float(self.properties["openslide.mpp-x"])
            mpp_y = float(self.properties["openslide.mpp-y"])
        except (KeyError, ValueError):
            return None
        if not (math.isfinite(mpp_x) and math.isfinite(mpp_y)) or mpp_x <= 0 or mpp_y <= 0:
            return None
        return mpp_x, mpp_y

    @cached_property
    def objective_power(self) -> float | None:
        try:
            return float(self.properties["openslide.objective-power"])
        except (KeyError, ValueError):
            return None

    @cached_property
    def background(self) -> tuple[int, int, int]:
        """Colour OpenSlide composites transparent pixels on (white unless the file says)."""
        value = self.properties.get("openslide.background-color")
        if value and len(value) == 6:
            try:
                return tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
            except ValueError:
                pass
        return (255, 255, 255)

    def metadata(self) -> dict:
        """Everything a viewer layer should carry about the slide (plain Python types)."""
        return {
            "path": str(self.requested_path),
            "vendor": self.vendor,
            "mpp": self.mpp,
            "units": "µm" if self.mpp else "pixel",
            "objective_power": self.objective_power,
            "dimensions": self.dimensions,
            "level_dimensions": self.level_dimensions,
            "level_downsamples": self.level_downsamples,
            "tile_sizes": self.tile_sizes,
            "backend": self.backend_name,
            "level_backends": self.level_backends,
            "properties": dict(self.properties),
            "associated_images": list(self.associated_images),
        }

    # -- pixels ---------------------------------------------------------------------------
    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``(height, width, 3)`` uint8 RGB of ``level`` at level coordinates ``(x, y)``.

        Parts outside the level are filled with the slide's background colour. The array may
        be read-only (shared with the chunk cache): copy it before writing into it.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} does not exist; the slide has {self.level_count}")
        if width < 0 or height < 0:
            raise ValueError(f"negative size {(width, height)}")
        reader = self._readers[level]
        if x >= 0 and y >= 0 and x + width <= reader.width and y + height <= reader.height:
            return reader.window(x, y, width, height)
        out = np.empty((height, width, 3), dtype=np.uint8)
        out[...] = self.background
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, reader.width), min(y + height, reader.height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = reader.window(x0, y0, x1 - x0, y1 - y0)
        return out

    def jpeg_tiles(self, level: int) -> JpegTileLevel | None:
        """``level``'s stored JPEG tiles as stand-alone streams (for a GPU decoder), or None
        when the level is not read directly from JPEG tiles (see :mod:`.jpeg_tiles`)."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} does not exist; the slide has {self.level_count}")
        return jpeg_tile_level(self._readers[level].backend, level)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """OpenSlide-style read: level-0 ``location`` (x, y), ``level``, ``size`` (w, h).

        Returns ``(h, w, 3)`` uint8 RGB composited on the background colour. The level-0
        location maps to the level pixel containing it (no resampling).
        """
        sx, sy = self.geometry.level_scale(level)
        x = math.floor(location[0] / sx + 1e-9)
        y = math.floor(location[1] / sy + 1e-9)
        return self.read_level(level, x, y, int(size[0]), int(size[1]))

    @cached_property
    def pyramid(self) -> list[da.Array]:
        """One lazy ``(H, W, 3)`` uint8 dask array per level, chunked on the tile grid."""
        return level_arrays(self._readers)

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """The smallest level with a longer side ≥ ``max_size`` (or level 0), read whole."""
        level = self.geometry.choose_level(*self.dimensions, size=max_size)
        w, h = self.level_dimensions[level]
        return self.read_level(level, 0, 0, w, h)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release file handles and cached pixels."""
        self.cache.clear()
        self._backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.name!r}, {self.vendor}, {self.dimensions[0]}x"
            f"{self.dimensions[1]}, levels={self.level_count}, mpp={self.mpp})"
        )


def open_slide(path: str | Path, cache_bytes: int | None = None, backend: str = "auto") -> Slide:
    """Open a whole-slide image lazily.

    Parameters
    ----------
    path : str or Path
        Any OpenSlide format (.svs .tif .ndpi .vms .vmu .scn .mrxs .svslide .bif .dcm) or a
        folder of DICOM files.
    cache_bytes : int, optional
        Bound of the decoded-chunk cache shared by all levels (default
        ``$NAPARI_MAGNET_CACHE_MB`` or 512 MB).
    backend : {"auto", "openslide", "tifffile"}
        Pixel path; ``"auto"`` decodes tiled TIFFs directly and uses OpenSlide otherwise.

    Raises
    ------
    SlideError
        The file is missing, not a slide, or cannot be opened or decoded.
    """
    return Slide(path, cache_bytes=cache_bytes, backend=backend)
