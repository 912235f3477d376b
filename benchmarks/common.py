"""Shared pieces of the benchmarks: the machine, the big synthetic slide, timing helpers."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATA_DIR = Path(
    os.environ.get("NAPARI_MAGNET_BENCH_DATA", Path(__file__).resolve().parent / "_data")
)
BIG_SIDE = int(os.environ.get("NAPARI_MAGNET_BENCH_SIDE", 100_000))


@dataclass
class Section:
    """One benchmark's figures, rendered as a Markdown section of RESULTS.md."""

    title: str
    goal: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", "", f"Goal: {self.goal}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def machine() -> str:
    """A one-line description of the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kib = int(fh.readline().split()[1])
            mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError):
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Median wall time of ``repeat`` calls, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def big_slide_path(progress: bool = True) -> Path:
    """The generated ``BIG_SIDE``² synthetic slide, made once and reused."""
    from napari_magnet.synth import SyntheticSlideSpec, generate_slide

    path = DATA_DIR / f"synthetic_{BIG_SIDE}.tif"
    if path.exists():
        return path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSlideSpec(
        width=BIG_SIDE, height=BIG_SIDE, mpp=0.25, seed=1, label=1, lesion_kind="macro"
    )
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        if progress and (done == total or done % max(total // 20, 1) == 0):
            print(
                f"  generating {path.name}: {done}/{total} tiles "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    generate_slide(path, spec, progress=report)  # writes a temporary file, renames when done
    return path


# ------------------------------------------------------------------ viewport benchmark slide

VIEWPORT_SLIDE = (20_000, 16_000, 256)  # width, height, tile side


def viewport_slide_path(progress: bool = True) -> Path:
    """The generated 20,000 × 16,000 JPEG tiled TIFF with 256 px tiles, made once and reused.

    Parameters
    ----------
    progress : bool
        Print the generation's progress.

    Returns
    -------
    Path
        The slide (generic-tiff for OpenSlide, 0.25 µm per pixel, one macro lesion).
    """
    from napari_magnet.synth import SyntheticSlideSpec, generate_slide

    width, height, tile = VIEWPORT_SLIDE
    path = DATA_DIR / f"synthetic_{width}x{height}_tile{tile}.tif"
    if path.exists():
        return path
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    spec = SyntheticSlideSpec(
        width=width, height=height, mpp=0.25, seed=2, label=1, lesion_kind="macro", tile=tile
    )
    if progress:
        print(f"  generating {path.name}", flush=True)
    generate_slide(path, spec)
    return path


class OpenSlideReader:
    """Raw OpenSlide: ``read_region`` and the RGBA → RGB conversion, nothing else.

    Parameters
    ----------
    path : Path
        Any OpenSlide slide.
    """

    def __init__(self, path: Path) -> None:
        import openslide

        self.osr = openslide.OpenSlide(str(path))
        self.downsamples = self.osr.level_downsamples

    def read(self, level: int, x: int, y: int, w: int, h: int):
        """``(h, w, 3)`` RGB of ``level`` at level coordinates ``(x, y)``."""
        ds = self.downsamples[level]
        image = self.osr.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h))
        return np.asarray(image.convert("RGB"))

    def close(self) -> None:
        self.osr.close()


class NapariWSIReader:
    """napari-wsi 1.3's dask arrays (its OpenSlide store, sRGB as its reader asks).

    Parameters
    ----------
    path : Path
        Any OpenSlide slide.
    """

    def __init__(self, path: Path) -> None:
        from napari_wsi.backends.common import WSIReaderBackend
        from napari_wsi.color_transform import ColorSpace
        from napari_wsi.common import open_store

        self.store = open_store(
            path, backend=WSIReaderBackend.OPENSLIDE, color_space=ColorSpace.sRGB
        )
        ((data, _, _),) = self.store.to_layer_data_tuples()
        self.arrays = data if isinstance(data, list) else [data]

    def read(self, level: int, x: int, y: int, w: int, h: int):
        """The window as napari computes it: ``np.asarray`` of the level's dask slice."""
        return np.asarray(self.arrays[level][y : y + h, x : x + w])

    def close(self) -> None:
        self.store.close()


# ------------------------------------------------------------------ viewport reads

SCREEN = (1920, 1080)


class OursReader:
    """Our pyramid read as napari reads it: ``np.asarray(level[y0:y1, x0:x1, :][..])``
    (napari slices the displayed box, then the non-displayed dimensions, then asks for it)."""

    def __init__(self, path: Path, backend: str = "auto") -> None:
        from napari_magnet.slide import open_slide

        self.slide = open_slide(path, backend=backend)
        self.arrays = self.slide.pyramid

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        box = self.arrays[level][y : y + h, x : x + w, :]
        return np.asarray(box[(slice(None), slice(None))])

    def close(self) -> None:
        self.slide.close()


def tissue_mask(path: Path) -> tuple[np.ndarray, float]:
    """Tissue mask of a thumbnail (the grey filter's rule: max−min of RGB ≥ 15) and its
    level-0 pixels per mask pixel."""
    from napari_magnet.slide import open_slide

    with open_slide(path) as slide:
        thumb = slide.thumbnail(1024)
        scale = slide.dimensions[0] / thumb.shape[1]
    rgb = thumb.astype(np.int16)
    return (rgb.max(-1) - rgb.min(-1)) >= 15, scale


def pick_viewports(path: Path, n: int, seed: int = 0, min_tissue: float = 0.0) -> list[tuple]:
    """``n`` random level-0 screens ``(level, x, y, w, h)``, cut to the slide, on tissue."""
    import openslide

    with openslide.OpenSlide(str(path)) as osr:
        width, height = osr.level_dimensions[0]
    mask, scale = tissue_mask(path) if min_tissue > 0 else (None, 1.0)
    w, h = min(SCREEN[0], width), min(SCREEN[1], height)
    rng = np.random.default_rng(seed)
    chosen: list[tuple] = []
    for _ in range(200 * n):
        if len(chosen) == n:
            break
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if mask is not None:
            cut = mask[
                int(y / scale) : int((y + h) / scale) + 1, int(x / scale) : int((x + w) / scale) + 1
            ]
            if cut.mean() < min_tissue:
                continue
        chosen.append((0, x, y, w, h))
    return chosen


def measure(methods: dict, windows: list[tuple], repeats: int) -> dict:
    """Median seconds per window, cold and warm, and open time per method.

    Cold: a fresh reader per window (open untimed, so every cache is empty); warm: the same
    window again on that reader (OpenSlide's best case: its own tile cache holds the
    window's tiles). Methods alternate window by window, their order rotating.
    """
    names = list(methods)
    totals = {n: {"cold": [], "warm": [], "open": []} for n in names}
    for rep in range(repeats):
        sums = {n: {"cold": 0.0, "warm": 0.0, "open": 0.0} for n in names}
        for i, window in enumerate(windows):
            k = (rep + i) % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                reader = methods[name]()
                t1 = time.perf_counter()
                try:
                    reader.read(*window)
                    t2 = time.perf_counter()
                    reader.read(*window)
                    t3 = time.perf_counter()
                finally:
                    reader.close()
                for key, value in (("open", t1 - t0), ("cold", t2 - t1), ("warm", t3 - t2)):
                    sums[name][key] += value / len(windows)
        for name in names:
            for key, value in sums[name].items():
                totals[name][key].append(value)
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in totals.items()}


def warm_page_cache(path: Path) -> None:
    """Read ``path`` once so every reader finds it in the OS page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass
