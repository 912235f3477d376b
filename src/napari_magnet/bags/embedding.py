"""Patch embeddings of bag files (``napari-magnet embed``; DESIGN §9-10).

Patches are read through the slide's pyramid by :class:`~napari_magnet.engine.regions.
RegionReader` — each from the level the grid chose, on worker threads, resampled with
``roi_align`` on the device — one batch ahead of the encoder (a reading thread overlaps the
next batch's decoding with the current batch's forward pass); on CUDA the JPEG tiles are
decoded on the GPU (:mod:`napari_magnet.engine.tile_decode`). Output pixels whose centre lies
past the slide's edge take the slide's background colour, as :func:`.pixels.read_patch`
gives them. On CUDA the encoder runs under bf16 autocast. The features of every
magnification are added to the bag file with :func:`.bagfile.add_features` (atomic: a killed
run leaves the old file or the new one), with the encoder's name and a configuration hash as
attributes; a bag that already holds features with the same hash is skipped unless
``overwrite``.

:func:`embed_bag` is the unit of work (one bag in, one outcome back, never an exception for
a bad bag), :func:`embed_bags` the serial loop the CLI uses.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from ..io.atomic import atomic_path
from ..slide import Slide, SlideError, open_slide
from .bagfile import BagError, add_features, read_bag, validate_bag
from .encoders import Encoder, EncoderError
from .records import Bag, BagLevel

__all__ = [
    "DTYPES",
    "EmbedOutcome",
    "embed_bag",
    "embed_bags",
    "embed_level",
    "fill_outside",
    "find_slide",
    "has_features_of",
    "summary",
]

DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class EmbedOutcome:
    """What happened to one bag.

    Parameters
    ----------
    bag : Path
        The bag file read.
    output : Path
        The bag file holding the features.
    status : str
        ``"written"``, ``"skipped"`` (features of this configuration exist) or ``"failed"``.
    patches : int
        Patches embedded (all magnifications).
    reason : str
        Why it failed (empty otherwise).
    seconds : float
        Time spent on it.
    """

    bag: Path
    output: Path
    status: str
    patches: int = 0
    reason: str = ""
    seconds: float = 0.0


def find_slide(bag: Bag, slides_dir: str | Path | None = None) -> Path:
    """The slide a bag was made from: ``slide_file`` in ``slides_dir``, else where it was
    when the bag was made (``slide_path``), else beside the bag.

    Raises
    ------
    BagError
        The bag names no slide, or it is in neither place.
    """
    name = bag.attrs.get("slide_file")
    if not name:
        raise BagError(bag.path, "the bag records no slide file")
    places = [Path(slides_dir)] if slides_dir is not None else []
    recorded = bag.attrs.get("slide_path")
    if recorded and Path(str(recorded)).name == str(name):
        places.append(Path(str(recorded)).parent)
    if bag.path is not None:
        places.append(bag.path.parent)
    for place in places:
        if (place / str(name)).is_file():
            return place / str(name)
    where = " or ".join(str(p) for p in places)
    raise BagError(bag.path, f"slide {name} not found in {where}; give its folder (--slides)")


def fill_outside(
    pixels: torch.Tensor, boxes: np.ndarray, size: tuple[int, int], background: tuple
) -> None:
    """Give output pixels whose centre lies past the slide's edge the background colour."""
    width, height = size
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width)
    outside |= boxes[:, 3] > height
    if not outside.any():
        return
    n = pixels.shape[-1]
    centres = (np.arange(n) + 0.5) / n
    colour = torch.tensor(background, dtype=torch.uint8, device=pixels.device).view(3, 1, 1)
    for i in np.flatnonzero(outside):
        x0, y0, x1, y1 = boxes[i]
        xs = x0 + centres * (x1 - x0)
        ys = y0 + centres * (y1 - y0)
        off = ((ys < 0) | (ys >= height))[:, None] | ((xs < 0) | (xs >= width))[None, :]
        mask = torch.from_numpy(off).to(pixels.device)
        pixels[i] = torch.where(mask[None], colour, pixels[i])


def embed_level(
    reader,
    level: BagLevel,
    encoder: Encoder,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """The features of one magnification's patches, in the bag's order.

    Parameters
    ----------
    reader : RegionReader
        Reads the patches from the slide's pyramid on the encoder's device.
    level : BagLevel
        The patches.
    encoder : Encoder
        The encoder (its module's device is where the forward pass runs).
    batch_size : int
        Patches per forward pass.
    progress : callable, optional
        Called with the number of patches done after each batch.

    Returns
    -------
    np.ndarray
        ``(N, encoder.dim)`` float32.
    """
    device = reader.device
    boxes = level.boxes()
    size = int(level.patch_size)
    slide = reader.slide
    starts = list(range(0, len(level), max(1, int(batch_size))))
    out = np.empty((len(level), encoder.dim), dtype=np.float32)

    def read(start: int) -> torch.Tensor:
        chunk = boxes[start : start + batch_size]
        pixels = reader.read(chunk, size).pixels
        fill_outside(pixels, chunk, slide.dimensions, slide.background)
        return pixels

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with ThreadPoolExecutor(1, thread_name_prefix="napari-magnet-embed") as ahead:
        pending = ahead.submit(read, starts[0]) if starts else None
        for k, start in enumerate(starts):
            pixels = pending.result()
            if k + 1 < len(starts):
                pending = ahead.submit(read, starts[k + 1])
            with torch.inference_mode(), autocast:
                features = encoder.module(pixels)
            out[start : start + len(pixels)] = features.float().cpu().numpy()
            if progress is not None:
                progress(start + len(pixels))
    return out


def _has_features(path: Path, config_hash: str) -> bool:
    """Whether every magnification of a valid bag holds features of this configuration."""
    if validate_bag(path):
        return False
    with h5py.File(path, "r") as f:
        for name in [str(v) for v in f.attrs["levels"]]:
            dset = f[name].get("features")
            if dset is None or str(dset.attrs.get("config_hash", "")) != config_hash:
                return False
    return True


def _same_grids(a: Path, b: Path) -> bool:
    """Whether two valid bag files hold the same patching configuration and coordinates."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        levels = [str(v) for v in fa.attrs["levels"]]
        return (
            fa.attrs.get("config") == fb.attrs.get("config")
            and levels == [str(v) for v in fb.attrs["levels"]]
            and all(np.array_equal(fa[f"{n}/coords"][()], fb[f"{n}/coords"][()]) for n in levels)
        )


def has_features_of(bag_path: Path, output: Path, config_hash: str) -> bool:
    """Whether ``output`` already holds ``bag_path``'s grids with features of ``config_hash``
    at every magnification (the bag is then skipped on a resumed run)."""
    return (
        output.exists()
        and _has_features(output, config_hash)
        and (output.resolve() == bag_path.resolve() or _same_grids(bag_path, output))
    )


def _copy_bag(source: Path, output: Path) -> None:
    """Copy ``source`` onto ``output`` atomically unless it already holds the same grids."""
    if output.exists() and output.resolve() == source.resolve():
        return
    if output.exists() and not validate_bag(output) and _same_grids(source, output):
        return
    with atomic_path(output) as tmp:
        shutil.copyfile(source, tmp)


def embed_bag(
    bag_path: str | Path,
    encoder: Encoder,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    output: str | Path | None = None,
    slide: str | Path | Slide | None = None,
    slides_dir: str | Path | None = None,
    dtype: str = "float16",
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    decode: str = "auto",
) -> EmbedOutcome:
    """Embed every magnification of one bag file; a failure is returned, not raised.

    Parameters
    ----------
    bag_path : path-like
        One of our bag files (``napari-magnet patch``).
    encoder : Encoder
        From :func:`.encoders.build_encoder`.
    device : torch.device or str, optional
        Where patches are resampled and encoded (default: the encoder's device).
    batch_size : int
        Patches per forward pass.
    output : path-like, optional
        The bag file to hold the features (default: ``bag_path`` itself); a different file
        gets a copy of the bag first.
    slide : path-like or Slide, optional
        The slide (default: :func:`find_slide` with ``slides_dir``).
    slides_dir : path-like, optional
        Where the slide file is looked for first.
    dtype : {"float16", "float32"}
        Storage type of the features.
    overwrite : bool
        Embed again a bag that holds features of this configuration.
    workers : int, optional
        Reading threads (default: CPU count, at most 8).
    progress : callable, optional
        ``progress(done, total)`` patches, after each batch.
    decode : {"auto", "host", "device"}
        Where JPEG tiles are decoded (:class:`~napari_magnet.engine.regions.RegionReader`):
        ``"auto"`` on the device when it is a GPU.

    Returns
    -------
    EmbedOutcome
        ``"written"``, ``"skipped"`` or ``"failed"`` (with the reason; the output file is
        then as it was).
    """
    from ..engine.regions import RegionReader

    bag_path = Path(bag_path)
    output = bag_path if output is None else Path(output)
    start_time = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config_hash = encoder.config_hash(dtype=dtype)
    if device is None:
        device = next(encoder.module.parameters()).device
    try:
        problems = validate_bag(bag_path)
        if problems:
            raise BagError(bag_path, "; ".join(problems))
        if not overwrite and has_features_of(bag_path, output, config_hash):
            seconds = time.perf_counter() - start_time
            return EmbedOutcome(bag_path, output, "skipped", seconds=seconds)
        bag = read_bag(bag_path, features=False)
        total = sum(len(level) for level in bag.levels)
        opened = None
        if not isinstance(slide, Slide):
            opened = open_slide(slide if slide is not None else find_slide(bag, slides_dir))
        the_slide = opened or slide
        done = 0
        features = {}
        try:
            with RegionReader(the_slide, workers=workers, device=device, decode=decode) as reader:
                for level in bag.levels:

                    def report(n: int, base: int = done) -> None:
                        if progress is not None:
                            progress(base + n, total)

                    array = embed_level(reader, level, encoder, batch_size, report)
                    features[level.mpp] = array.astype(DTYPES[dtype])
                    done += len(level)
        finally:
            if opened is not None:
                opened.close()
        _copy_bag(bag_path, output)
        add_features(
            output,
            features,
            encoder.name,
            {
                "config_hash": config_hash,
                "config": json.dumps({**encoder.config, "dtype": dtype}, sort_keys=True),
                "dim": int(encoder.dim),
            },
        )
    except (SlideError, BagError, EncoderError, ValueError, OSError) as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - one bag's failure must not stop a cohort
        reason = f"{type(error).__name__}: {error}"
    else:
        return EmbedOutcome(
            bag_path, output, "written", total, seconds=time.perf_counter() - start_time
        )
    return EmbedOutcome(
        bag_path, output, "failed", reason=reason, seconds=time.perf_counter() - start_time
    )


def embed_bags(
    bags: Iterable[str | Path],
    out_dir: str | Path,
    encoder: Encoder,
    progress: Callable[[EmbedOutcome], None] | None = None,
    **options,
) -> list[EmbedOutcome]:
    """Embed bag files one after the other into ``out_dir/<name>.h5``.

    Parameters
    ----------
    bags : iterable of path-like
        Our bag files.
    out_dir : path-like
        Where the bags with features go (the bags' own folder: in place).
    encoder : Encoder
        The encoder.
    progress : callable, optional
        Called with each bag's outcome as it is known.
    **options
        Passed to :func:`embed_bag` (``device``, ``batch_size``, ``dtype``, ``overwrite``,
        ``slides_dir``, ``workers``).
    """
    outcomes = []
    for bag in bags:
        bag = Path(bag)
        outcome = embed_bag(bag, encoder, output=Path(out_dir) / bag.name, **options)
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    return outcomes


def summary(outcomes: Sequence[EmbedOutcome]) -> str:
    """One line: how many bags were written, skipped and failed."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("written", "skipped", "failed")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())
