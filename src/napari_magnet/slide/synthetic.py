"""Deterministic synthetic whole-slide images with ground truth (DESIGN §7).

:func:`generate_slide` writes a real pyramidal, tiled, JPEG-compressed TIFF that OpenSlide
opens as ``generic-tiff``: level 0 is the first IFD, each lower level (downsample 4, 16, ...,
down to at most 1024 px on the longer side) is a further main IFD with the "reduced
resolution" bit set, tiles are YCbCr 4:2:0 JPEG, and XResolution/YResolution in pixels per
centimetre give OpenSlide's ``openslide.mpp-x``/``mpp-y``.

The content imitates an H&E-stained lymph-node section: one to three irregular tissue
pieces (pink stroma with purple nuclei) on near-white glass, and, on positive slides,
tumour deposits sized like Camelyon's classes (macro > 2 mm, micro 0.2-2 mm, isolated
tumour cells < 0.2 mm) with larger, pleomorphic, densely packed nuclei in nests. Slides of
either label can carry *distractors* whose mean colour matches the tumour's (dense small
lymphocytes, or dark tissue folds), so colour alone cannot separate the classes. Stain
vectors, stain intensity and glass tone vary with the seed.

How it stays fast (a 100,000 x 100,000 px slide takes about a minute on two cores, with
a few hundred MB of memory):

* The slide is described at coarse resolution only: a tissue level-set field on a grid of
  about 32 µm cells, two smooth stain-variation fields, and one small level-set grid per
  lesion. Nothing of a full level is ever held in memory.
* Texture comes from a small bank of *periodic* textures (periods of about 0.5 mm) built
  once per slide with FFT-filtered noise and blobs. A tile's texture is a plain slice of
  the bank at the tile's global position, so neighbouring tiles join without seams.
* Each tile is rendered independently: bilinear interpolation of the coarse fields, a few
  numpy blends on the tile viewed as (T, 3T), then JPEG encoding, in a thread pool
  (numpy and libjpeg-turbo release the GIL). Glass tiles are encoded once and their
  bytes reused; tifffile receives an iterator of already-encoded tiles.
* Lower pyramid levels are rendered at their own resolution from the same description
  (with block-averaged textures), not by downsampling level 0. Their mean colours match
  the downsampled level 0.

The module imports neither torch nor napari.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

__all__ = [
    "LESION_KINDS",
    "SLIDE_CLASSES",
    "SIZE_RANGES_MM",
    "Lesion",
    "SyntheticSlideSpec",
    "SyntheticSlideInfo",
    "generate_slide",
    "read_ground_truth",
    "generate_cohort",
    "sidecar_path",
]

#: Kinds a :class:`Lesion` can have. The first three are tumour.
LESION_KINDS: tuple[str, ...] = ("macro", "micro", "itc", "distractor")
_TUMOUR_KINDS: tuple[str, ...] = ("macro", "micro", "itc")
#: Slide classes (``SyntheticSlideInfo.lesion_kind``): the largest tumour lesion, or negative.
SLIDE_CLASSES: tuple[str, ...] = ("negative", "itc", "micro", "macro")
#: Camelyon size classes: (lower, upper) bound of a lesion's largest dimension in mm.
SIZE_RANGES_MM: dict[str, tuple[float, float]] = {
    "macro": (2.0, math.inf),
    "micro": (0.2, 2.0),
    "itc": (0.0, 0.2),
}
# Sizes actually drawn, in mm, safely inside the class ranges. For "macro" the number is the
# longer side of the lesion's box; for "micro" and "itc" it is the largest diameter (so that
# the box, which is never larger, stays inside the range too).
_DRAW_MM: dict[str, tuple[float, float]] = {
    "macro": (2.2, 6.0),
    "micro": (0.3, 1.7),
    "itc": (0.04, 0.17),
}
_MIN_SIDE = 64
_MAX_SIDE = 2**20  # 1,048,576 px: 26 cm at 0.25 µm/px, larger than any glass slide
_MAX_MPP = 100.0
_MAX_LEVEL_SIDE = 1024  # the pyramid goes down until the longer side is at most this
_LEVEL_FACTOR = 4
_FIT = 0.8  # a lesion's box may use at most this fraction of the slide's shorter side
_FORMAT = "napari-magnet-synthetic-slide"
_VERSION = 1

# Texture periods: about 0.5 mm, in level-0 pixels a power of two between 256 and 1024 (the
# second texture of each kind has 1.5 times that period, so their mix repeats only every
# 3 periods). Block means are exact while period / downsample is an integer >=
# _MIN_PERIOD_PX; coarser levels use the mean colour.
_PERIOD_UM = 512.0
_PERIOD_RANGE = (256, 1024)
_MIN_PERIOD_PX = 16  # below this a level's texture is its mean colour


# --------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lesion:
    """One lesion (or look-alike distractor) of a synthetic slide.

    Parameters
    ----------
    kind : str
        ``"macro"``, ``"micro"`` or ``"itc"`` (tumour), or ``"distractor"`` (dark,
        tumour-coloured but normal tissue: dense lymphocytes or a tissue fold).
    box : tuple of float
        Bounding box ``(x0, y0, x1, y1)`` in level-0 pixels (x right, y down).
    """

    kind: str
    box: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        if self.kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {self.kind!r}; expected one of {LESION_KINDS}")
        if len(self.box) != 4:
            raise ValueError(f"lesion box must be (x0, y0, x1, y1), got {self.box!r}")
        x0, y0, x1, y1 = (float(v) for v in self.box)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"lesion box must have x1 > x0 and y1 > y0, got {self.box!r}")
        object.__setattr__(self, "box", (x0, y0, x1, y1))

    @property
    def is_tumour(self) -> bool:
        """Whether the lesion is tumour (macro, micro or itc)."""
        return self.kind in _TUMOUR_KINDS

    def size_mm(self, mpp: float) -> float:
        """Longer side of the box in millimetres at ``mpp`` µm per level-0 pixel."""
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0) * mpp / 1000.0


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What to generate.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels, each in [64, 2**20].
    mpp : float
        Microns per level-0 pixel (0 < mpp <= 100); 0.25 and 0.5 are typical (40x, 20x).
    seed : int
        Non-negative seed; the same spec always gives the same pixels.
    label : int or None
        1 = the slide carries tumour, 0 = negative, None = drawn from the seed (or implied
        by ``lesion_kind``).
    lesion_kind : str or None
        Slide class: ``"macro"``, ``"micro"``, ``"itc"`` or ``"negative"``; None = drawn
        from the seed among the kinds that fit the slide.
    tile : int
        TIFF tile side in pixels (multiple of 16, 64 to 4096).
    quality : int
        JPEG quality, 1 to 100.

    Raises
    ------
    ValueError
        If any value is out of range, the label and kind contradict each other, or the
        slide is too small for the requested lesion kind.
    """

    width: int
    height: int
    mpp: float = 0.5
    seed: int = 0
    label: int | None = None
    lesion_kind: str | None = None
    tile: int = 512
    quality: int = 80

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not _MIN_SIDE <= int(value) <= _MAX_SIDE:
                raise ValueError(
                    f"{name}={value} px is out of range: a synthetic slide side must be "
                    f"between {_MIN_SIDE} and {_MAX_SIDE} px"
                )
            object.__setattr__(self, name, int(value))
        try:
            mpp = float(self.mpp)
        except (TypeError, ValueError):
            raise ValueError(f"mpp must be a number, got {self.mpp!r}") from None
        if not (math.isfinite(mpp) and 0.0 < mpp <= _MAX_MPP):
            raise ValueError(f"mpp must be > 0 and <= {_MAX_MPP} µm per pixel, got {self.mpp!r}")
        object.__setattr__(self, "mpp", mpp)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed must be a non-negative integer below 2**63, got {self.seed}")
        object.__setattr__(self, "seed", int(self.seed))
        if self.label is not None:
            if self.label not in (0, 1):
                raise ValueError(f"label must be 0, 1 or None, got {self.label!r}")
            object.__setattr__(self, "label", int(self.label))
        if self.lesion_kind is not None:
            if self.lesion_kind not in SLIDE_CLASSES:
                raise ValueError(
                    f"unknown lesion kind {self.lesion_kind!r}; expected one of "
                    f"{('macro', 'micro', 'itc', 'negative')} or None"
                )
            if self.label == 1 and self.lesion_kind == "negative":
                raise ValueError("label=1 contradicts lesion_kind='negative'")
            if self.label == 0 and self.lesion_kind != "negative":
                raise ValueError(
                    f"label=0 (negative) contradicts lesion_kind={self.lesion_kind!r}; "
                    "use lesion_kind='negative' or None"
                )
            if self.lesion_kind in _TUMOUR_KINDS and self.lesion_kind not in _feasible_kinds(
                self.width, self.height, mpp
            ):
                lo = _DRAW_MM[self.lesion_kind][0]
                raise ValueError(
                    f"a {self.width}x{self.height} px slide at {mpp} µm/px "
                    f"({self.width * mpp / 1000:.2f} x {self.height * mpp / 1000:.2f} mm) is too "
                    f"small for a {self.lesion_kind!r} lesion (needs about {lo / _FIT:.2f} mm "
                    "on the shorter side)"
                )
        if self.label == 1 and not _feasible_kinds(self.width, self.height, mpp):
            raise ValueError(
                f"a {self.width}x{self.height} px slide at {mpp} µm/px is too small to carry "
                "any lesion; use label=0 or a larger slide"
            )
        if isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer)):
            raise ValueError(f"tile must be an integer, got {self.tile!r}")
        if not (64 <= int(self.tile) <= 4096 and int(self.tile) % 16 == 0):
            raise ValueError(f"tile must be a multiple of 16 between 64 and 4096, got {self.tile}")
        object.__setattr__(self, "tile", int(self.tile))
        if isinstance(self.quality, bool) or not isinstance(self.quality, (int, np.integer)):
            raise ValueError(f"quality must be an integer, got {self.quality!r}")
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"JPEG quality must be between 1 and 100, got {self.quality}")
        object.__setattr__(self, "quality", int(self.quality))


@dataclass(frozen=True)
class SyntheticSlideInfo:
    """A generated slide and its ground truth (also stored in the sidecar JSON).

    Parameters
    ----------
    path : Path
        The slide file.
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Microns per level-0 pixel.
    seed : int
        The seed it was generated from.
    label : int
        1 if the slide carries tumour (macro, micro or itc), else 0.
    lesion_kind : str
        Slide class: ``"macro"``, ``"micro"``, ``"itc"`` (the largest tumour lesion) or
        ``"negative"``.
    lesions : tuple of Lesion
        Tumour lesions and distractors, level-0 boxes.
    levels : tuple of (int, int)
        ``(width, height)`` of each pyramid level, level 0 first.
    """

    path: Path
    width: int
    height: int
    mpp: float
    seed: int
    label: int
    lesion_kind: str
    lesions: tuple[Lesion, ...]
    levels: tuple[tuple[int, int], ...]

    @property
    def tumour_lesions(self) -> tuple[Lesion, ...]:
        """The lesions that are tumour (no distractors)."""
        return tuple(les for les in self.lesions if les.is_tumour)

    @property
    def sidecar(self) -> Path:
        """Path of the ground-truth JSON next to the slide."""
        return sidecar_path(self.path)


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Ground-truth JSON path of a slide: ``<name>.tif`` -> ``<name>.truth.json``.

    Parameters
    ----------
    path : path-like
        The slide path (or the sidecar path itself, which is returned unchanged).

    Returns
    -------
    Path
    """
    p = Path(path)
    if p.name.endswith(".truth.json"):
        return p
    return p.with_name(p.stem + ".truth.json") if p.suffix else p.with_name(p.name + ".truth.json")


def _feasible_kinds(width: int, height: int, mpp: float) -> tuple[str, ...]:
    room_mm = _FIT * min(width, height) * mpp / 1000.0
    # A macro box needs its longer side >= 2.2 mm; micro/itc need their smallest diameter
    # (whose box is at most that diameter).
    return tuple(k for k in _TUMOUR_KINDS if room_mm >= _DRAW_MM[k][0])


def _level_sizes(width: int, height: int) -> tuple[list[tuple[int, int]], list[int]]:
    sizes = [(width, height)]
    downs = [1]
    while max(sizes[-1]) > _MAX_LEVEL_SIDE:
        d = downs[-1] * _LEVEL_FACTOR
        sizes.append((-(-width // d), -(-height // d)))
        downs.append(d)
    return sizes, downs


def _fft_freqs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    return fy, fx


def _gauss_tf(
    fy: np.ndarray, fx: np.ndarray, su: float, sv: float | None = None, angle: float = 0.0
) -> np.ndarray:
    """Fourier transfer function of a unit-sum Gaussian with std (su, sv) px along angle."""
    if sv is None or sv == su:
        return np.exp(-2.0 * np.pi**2 * su**2 * (fx**2 + fy**2)).astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    fu = fx * c + fy * s
    fv = -fx * s + fy * c
    return np.exp(-2.0 * np.pi**2 * (su**2 * fu**2 + sv**2 * fv**2)).astype(np.float32)


def _noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    sigma: float,
    sigma_hi: float | None = None,
    aniso: tuple[float, float] | None = None,
) -> np.ndarray:
    """Periodic Gaussian-filtered white noise, zero mean, unit std (float32).

    ``sigma`` is the smoothing length in pixels; with ``sigma_hi`` the result is band-pass
    (smoothed at ``sigma`` minus smoothed at ``sigma_hi``); with ``aniso=(ratio, angle)`` the
    smoothing is ``sigma * ratio`` along ``angle`` and ``sigma`` across it. The noise is
    synthesised directly in the Fourier domain (one inverse FFT).
    """
    fy, fx = _fft_freqs(shape)
    half = (shape[0], fx.shape[1])
    spec = np.empty(half, np.complex64)
    spec.real = rng.standard_normal(half, dtype=np.float32)
    spec.imag = rng.standard_normal(half, dtype=np.float32)
    if aniso is not None:
        tf = _gauss_tf(fy, fx, sigma * aniso[0], sigma, aniso[1])
    else:
        tf = _gauss_tf(fy, fx, sigma)
    if sigma_hi is not None:
        tf = tf - _gauss_tf(fy, fx, sigma_hi)
    spec *= tf
    spec[0, 0] = 0.0
    out = np.fft.irfft2(spec, s=shape).astype(np.float32)
    out -= out.mean()
    std = float(out.std())
    return out / std if std > 0 else out


def _blobs(
    rng: np.random.Generator,
    size: int,
    count: int,
    radius_px: float,
    weights: tuple[float, float] = (0.8, 1.2),
    elong: float = 1.0,
    orientations: int = 4,
    density: np.ndarray | None = None,
    jitter: float | None = None,
) -> np.ndarray:
    """Periodic field of Gaussian blobs scaled so that a weight-1 blob peaks at 5.

    Thresholding at 0.5 gives discs of about ``radius_px`` (ellipses ``elong`` times longer
    for ``elong > 1``, in ``orientations`` directions). ``density`` (optional, same size,
    in [0, 1]) thins the points by rejection so that they cluster where it is high. With
    ``jitter`` (fraction of the spacing) the points form a jittered lattice instead of a
    Poisson process, as cells in a cohesive sheet do.
    """
    if count <= 0:
        return np.zeros((size, size), np.float32)
    if jitter is None:  # Poisson points: clumps and gaps
        ys = rng.integers(0, size, count)
        xs = rng.integers(0, size, count)
    else:  # jittered lattice: packed cells that rarely overlap
        n = max(1, int(round(math.sqrt(count))))
        cell = size / n
        gy, gx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        jy = rng.uniform(-jitter, jitter, n * n)
        jx = rng.uniform(-jitter, jitter, n * n)
        ys = ((gy.ravel() + 0.5 + jy) * cell).astype(np.int64) % size
        xs = ((gx.ravel() + 0.5 + jx) * cell).astype(np.int64) % size
        count = n * n
    w = rng.uniform(weights[0], weights[1], count)
    if density is not None:
        keep = rng.random(count) < density[ys, xs]
        ys, xs, w = ys[keep], xs[keep], w[keep]
    # Narrow Gaussians scaled by 5: the 0.5 level is at a tenth of a blob's peak, so the
    # tails of packed neighbours do not add up into bridges between them.
    sigma = max(radius_px / 2.146, 0.35)  # 5 exp(-r^2 / 2 s^2) = 1/2 at r = radius
    fy, fx = _fft_freqs((size, size))
    groups = orientations if elong > 1.0 else 1
    gid = rng.integers(0, groups, ys.size)
    acc = None
    for g in range(groups):
        sel = gid == g
        img = np.zeros((size, size), np.float64)
        np.add.at(img, (ys[sel], xs[sel]), w[sel])
        su = sigma * elong
        tf = _gauss_tf(fy, fx, su, sigma, math.pi * g / groups) * (10.0 * math.pi * su * sigma)
        part = np.fft.rfft2(img) * tf
        acc = part if acc is None else acc + part
    return np.fft.irfft2(acc, s=(size, size)).astype(np.float32)


def _soft(x: np.ndarray, lo: float, width: float) -> np.ndarray:
    return np.clip((x - lo) / width + 0.5, 0.0, 1.0).astype(np.float32)


def _count(density_per_mm2: float, size_px: int, mpp: float) -> int:
    return int(round(density_per_mm2 * (size_px * mpp / 1000.0) ** 2))


# --------------------------------------------------------------------------------------
# Texture bank: stain concentrations (H = haematoxylin, E = eosin) of periodic textures
# --------------------------------------------------------------------------------------


def _tex_normal(rng: np.random.Generator, size: int, mpp: float, fibrous: bool):
    """Normal lymph-node/stroma tissue: small round lymphocytes, spindle nuclei, fibres."""
    um = 1.0 / mpp
    lymph = _blobs(
        rng, size, _count(1600 if fibrous else 4200, size, mpp), 3.3 * um, (0.75, 1.25)
    )
    spindle = _blobs(
        rng, size, _count(900 if fibrous else 450, size, mpp), 2.0 * um, (0.8, 1.2), elong=3.0
    )
    nuc = np.maximum(_soft(lymph, 0.5, 0.25), _soft(spindle, 0.5, 0.25))
    fib = _noise(rng, (size, size), 1.5 * um, aniso=(5.0 if fibrous else 3.0, rng.uniform(0, 3.14)))
    # (no rare, conspicuous features such as fat cells: the texture repeats with its
    # period, and only a statistically uniform texture hides that at low magnification)
    e = (0.36 if fibrous else 0.30) + (0.13 if fibrous else 0.09) * fib
    chrom = _noise(rng, (size, size), 0.6 * um)
    h = 0.035 + nuc * (0.85 + 0.12 * chrom)
    e = np.clip(e * (1.0 - 0.55 * nuc), 0.02, None)
    return h.astype(np.float32), e.astype(np.float32)


def _tex_tumour(rng: np.random.Generator, size: int, mpp: float):
    """Carcinoma metastasis: cohesive nests of large, pleomorphic, vesicular nuclei."""
    um = 1.0 / mpp
    nests = _noise(rng, (size, size), 22.0 * um)
    stroma = _soft(-np.abs(nests), -0.16, 0.1)  # thin fibrous septa between nests
    field = _blobs(
        rng,
        size,
        _count(1e6 / 15.5**2, size, mpp),
        5.0 * um,
        (0.65, 1.6),
        elong=1.35,
        density=1.0 - 0.97 * stroma,
        jitter=0.32,
    )
    field += 0.22 * _noise(rng, (size, size), 1.2 * um)  # irregular nuclear outlines
    nuc = _soft(field, 0.5, 0.3)
    core = _soft(field, 3.0, 1.5)  # pale centre: vesicular chromatin
    chrom = _noise(rng, (size, size), 0.7 * um)
    nucleoli = _soft(_blobs(rng, size, _count(3500, size, mpp), 1.1 * um), 0.5, 0.3) * core
    h = 0.03 + 0.14 * (1.0 - stroma) + nuc * (1.05 + 0.2 * chrom) - 0.3 * core + 0.7 * nucleoli
    e = 0.27 + 0.05 * _noise(rng, (size, size), 2.0 * um) + 0.25 * stroma
    e = np.clip(e * (1.0 - 0.45 * nuc), 0.02, None)
    return h.astype(np.float32), e.astype(np.float32)


def _tex_follicle(rng: np.random.Generator, size: int, mpp: float):
    """Distractor: packed, uniform small lymphocytes (a dense follicle)."""
    um = 1.0 / mpp
    lymph = _blobs(rng, size, _count(1e6 / 8.0**2, size, mpp), 2.9 * um, (0.85, 1.15), jitter=0.3)
    nuc = _soft(lymph, 0.5, 0.25)
    chrom = _noise(rng, (size, size), 0.6 * um)
    h = 0.06 + nuc * (1.0 + 0.1 * chrom)
    e = np.clip(0.16 + 0.04 * _noise(rng, (size, size), 3.0 * um) - 0.08 * nuc, 0.02, None)
    return h.astype(np.float32), e.astype(np.float32)


@dataclass
class _Stain:
    h: np.ndarray  # (3,) OD per unit haematoxylin
    e: np.ndarray  # (3,) OD per unit eosin
    bg: np.ndarray  # (3,) OD of glass

    def rgb(self, h: np.ndarray, e: np.ndarray) -> np.ndarray:
        od = h[..., None] * self.h + e[..., None] * self.e + self.bg
        return 255.0 * np.exp(-od)

    @property
    def glass(self) -> np.ndarray:
        return 255.0 * np.exp(-self.bg)


def _draw_stain(rng: np.random.Generator) -> _Stain:
    def unit(v: np.ndarray) -> np.ndarray:
        v = np.clip(v, 0.01, None)
        return v / np.linalg.norm(v)

    h = unit(np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.04, 3)) * rng.uniform(0.8, 1.25)
    e = unit(np.array([0.07, 0.99, 0.11]) + rng.normal(0, 0.04, 3)) * rng.uniform(0.7, 1.3)
    bg = np.clip(rng.uniform(0.015, 0.06) + rng.normal(0, 0.003, 3), 0.004, None)
    return _Stain(h.astype(np.float32), e.astype(np.float32), bg.astype(np.float32))


def _inv_uint8(rgb: np.ndarray) -> np.ndarray:
    """Store textures as 255 - RGB ("absorbance"), so that blends scale towards glass."""
    return np.clip(np.rint(255.0 - rgb), 0, 255).astype(np.uint8)


def _match_mean(stain: _Stain, h: np.ndarray, e: np.ndarray, target_mean: float):
    """Scale (h, e) so that the mean RGB intensity equals ``target_mean``."""
    sub = (slice(None, None, 4), slice(None, None, 4))
    lo, hi = 0.3, 3.0
    for _ in range(20):
        k = 0.5 * (lo + hi)
        m = float(stain.rgb(h[sub] * k, e[sub] * k).mean())
        if m > target_mean:
            lo = k
        else:
            hi = k
    k = 0.5 * (lo + hi)
    return h * k, e * k


@dataclass
class _Canvas:
    """A periodic texture at one level, extended by one tile so any tile is a slice."""

    data: np.ndarray  # (period + T, period + T[, 3])
    period: int

    def crop(self, y0: int, x0: int, t: int) -> np.ndarray:
        oy, ox = y0 % self.period, x0 % self.period
        return self.data[oy : oy + t, ox : ox + t]


def _canvas(tex: np.ndarray, t: int) -> _Canvas:
    """A periodic (p, p, c) texture extended by one tile, so that any tile is a slice."""
    p = tex.shape[0]
    reps = -(-(p + t) // p)
    big = np.tile(tex, (reps, reps, 1))[: p + t, : p + t]
    return _Canvas(np.ascontiguousarray(big), p)


# --------------------------------------------------------------------------------------
# Slide layout: tissue field, stain-variation fields, lesions
# --------------------------------------------------------------------------------------


@dataclass
class _LesionRender:
    lesion: Lesion
    texture: str  # "tumour" | "follicle" | "fold"
    ox: float  # level-0 position of grid sample (0, 0)
    oy: float
    cell: float  # level-0 px between grid samples
    field: np.ndarray  # (gh, gw) float32 signed distance, px, > 0 inside
    rag: float  # amplitude (level-0 px) of the ragged border


@dataclass
class _Plan:
    width: int
    height: int
    mpp: float
    tile: int
    quality: int
    sizes: list[tuple[int, int]]
    downs: list[int]
    cell: int  # level-0 px per coarse grid cell
    fields: np.ndarray  # (3, gh, gw): tissue signed distance (px), weights of A and of B
    rag_amp: float  # px amplitude of the ragged tissue border
    lesions: list[_LesionRender]
    glass_rgb: np.ndarray  # (3,) uint8
    glass_inv: np.ndarray  # (3,) float32
    canvases: list[dict[str, _Canvas]] = field(default_factory=list)


def _texture_period(mpp: float) -> int:
    """Period (level-0 px) of the smaller textures of the bank at ``mpp``."""
    p = 1 << int(round(math.log2(_PERIOD_UM / mpp)))
    return int(min(max(p, _PERIOD_RANGE[0]), _PERIOD_RANGE[1]))


def _grid_cell(width: int, height: int, mpp: float) -> int:
    """Coarse grid cell: about 32 µm, with at most ~2048 cells and at least 16 per side."""
    side = max(width, height)
    cell = 1 << max(0, int(round(math.log2(max(32.0 / mpp, 1.0)))))
    while side / cell > 2048:
        cell *= 2
    while cell > 1 and side / cell < 16:
        cell //= 2
    return cell


def _tissue_field(rng: np.random.Generator, width: int, height: int, cell: int) -> np.ndarray:
    """Signed distance-like field (level-0 px, > 0 inside tissue) on the coarse grid.

    One to three main pieces (noisy ellipses) along the slide's longer side, plus up to
    three small fragments. The noise fades outside each ellipse so that tissue keeps clear
    of the slide border.
    """
    gw, gh = -(-width // cell) + 1, -(-height // cell) + 1
    xs = (np.arange(gw, dtype=np.float32) + 0.5) * cell
    ys = (np.arange(gh, dtype=np.float32) + 0.5) * cell
    horizontal = width >= height
    long_side, short_side = (width, height) if horizontal else (height, width)
    n_pieces = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    slot = long_side / n_pieces
    scale_cells = min(width, height) / cell
    n1 = _noise(rng, (gh, gw), max(0.07 * scale_cells, 0.7))
    n2 = _noise(rng, (gh, gw), max(0.02 * scale_cells, 0.5))
    n3 = _noise(rng, (gh, gw), max(0.006 * scale_cells, 0.5))
    pieces = []
    for i in range(n_pieces):
        c_long = (i + 0.5 + rng.uniform(-0.04, 0.04)) * slot
        c_short = short_side * (0.5 + rng.uniform(-0.05, 0.05))
        a = rng.uniform(0.24, 0.32) * min(slot, 1.5 * short_side)  # semi-axis along long side
        b = rng.uniform(0.24, 0.31) * short_side
        pieces.append((c_long, c_short, a, b, 1.0))
    for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.3, 0.3, 0.25, 0.15]))):
        b = rng.uniform(0.015, 0.05) * short_side
        pieces.append(
            (
                rng.uniform(0.1, 0.9) * long_side,
                rng.uniform(0.12, 0.88) * short_side,
                b * rng.uniform(1.0, 1.8),
                b,
                0.6,
            )
        )
    f = np.full((gh, gw), -np.inf, np.float32)
    for c_long, c_short, a, b, amp in pieces:
        cx, cy = (c_long, c_short) if horizontal else (c_short, c_long)
        ax, by = (a, b) if horizontal else (b, a)
        th = rng.uniform(-0.5, 0.5)
        c, s = math.cos(th), math.sin(th)
        dx = xs[None, :] - cx
        dy = ys[:, None] - cy
        u = (dx * c + dy * s) / ax
        v = (-dx * s + dy * c) / by
        rho = np.sqrt(u * u + v * v)
        env = amp * np.exp(-((np.maximum(rho - 1.0, 0.0) / 0.35) ** 2))
        fp = (1.0 - rho + env * (0.24 * n1 + 0.08 * n2 + 0.035 * n3)) * math.sqrt(ax * by)
        f = np.maximum(f, fp.astype(np.float32))
    # safety: never touch the slide border
    margin = 0.02 * min(width, height)
    border = np.minimum(
        np.minimum(xs[None, :], width - xs[None, :]), np.minimum(ys[:, None], height - ys[:, None])
    )
    return np.minimum(f, (border - margin).astype(np.float32))


def _polar_shape(rng: np.random.Generator, irregular: float) -> tuple[np.ndarray, np.ndarray]:
    ks = np.arange(2, 13)
    amps = rng.uniform(0, 1, ks.size) / ks**1.3
    amps *= irregular / max(amps.sum(), 1e-6)
    phases = rng.uniform(0, 2 * math.pi, ks.size)
    return amps, phases


def _radius(theta: np.ndarray, amps: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """Radius (in units of the mean radius) of a lesion outline at angles ``theta``."""
    k = np.arange(2, 2 + amps.size)[:, None]
    waves = amps[:, None] * np.cos(k * theta.ravel()[None, :] + phases[:, None])
    return (1.0 + waves.sum(axis=0)).reshape(theta.shape)


def _make_lesion(
    rng: np.random.Generator,
    kind: str,
    texture: str,
    size_mm: float,
    measure: str,
    mpp: float,
    reach: float,
) -> tuple[tuple[float, float, float, float], Callable[[float, float], _LesionRender]]:
    """Shape a lesion; return its box offsets and a function placing it at (x, y).

    ``size_mm`` is the box's longer side (``measure="box"``) or the largest diameter
    (``measure="diameter"``). The level-set grid extends ``reach`` px beyond the box.
    """
    if texture == "fold":
        ecc = rng.uniform(0.08, 0.2)
        irregular = rng.uniform(0.02, 0.08)
    elif texture == "follicle":
        ecc = rng.uniform(0.75, 1.0)
        irregular = rng.uniform(0.02, 0.1)
    else:
        ecc = rng.uniform(0.55, 1.0)
        irregular = rng.uniform(0.12, 0.3)
    amps, phases = _polar_shape(rng, irregular)
    beta = rng.uniform(0, math.pi)
    theta = np.linspace(0, 2 * math.pi, 1441)[:-1]
    r = _radius(theta, amps, phases)
    px = r * np.cos(theta)
    py = ecc * r * np.sin(theta)
    cb, sb = math.cos(beta), math.sin(beta)
    bx = px * cb - py * sb
    by = px * sb + py * cb
    if measure == "box":
        unit = max(bx.max() - bx.min(), by.max() - by.min())
    else:  # largest diameter
        pts = np.stack([bx, by], 1)[::4]
        unit = float(np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max())
    radius = size_mm * 1000.0 / mpp / unit  # level-0 px per unit radius
    ext = (bx.min() * radius, by.min() * radius, bx.max() * radius, by.max() * radius)

    def place(x: float, y: float) -> _LesionRender:
        box = (x + ext[0], y + ext[1], x + ext[2], y + ext[3])
        span = max(box[2] - box[0], box[3] - box[1])
        rag = min(20.0 / mpp, 0.05 * span)
        pad = reach + rag + 8.0
        cell = max(1.0, min(span / 96.0, (span + 2 * pad) / 192.0))
        pad += 2.0 * cell
        ox, oy = box[0] - pad, box[1] - pad
        gw = int(math.ceil((box[2] - box[0] + 2 * pad) / cell)) + 1
        gh = int(math.ceil((box[3] - box[1] + 2 * pad) / cell)) + 1
        gx = ox + np.arange(gw) * cell - x
        gy = oy + np.arange(gh) * cell - y
        dx, dy = gx[None, :], gy[:, None]
        u = (dx * cb + dy * sb) / radius
        v = (-dx * sb + dy * cb) / (radius * ecc)
        rho = np.sqrt(u * u + v * v)
        th = np.arctan2(v, u)
        rr = _radius(th, amps, phases)
        # divide by |grad rho| (level-0 px) to get an approximate signed distance
        grad = np.sqrt(u * u + (v / ecc) ** 2) / np.maximum(rho, 1e-9) / radius
        fld = ((rr - rho) / np.maximum(grad, 1e-12)).astype(np.float32)
        return _LesionRender(Lesion(kind, box), texture, ox, oy, cell, fld, rag)

    return ext, place


def _plan_lesions(
    rng: np.random.Generator,
    width: int,
    height: int,
    mpp: float,
    label: int,
    kind: str,
    tissue: np.ndarray,
    cell: int,
    max_down: int,
) -> list[_LesionRender]:
    """Draw and place the tumour lesions and distractors of a slide."""
    reach = 3.0 * 1.5 * max_down  # how far beyond its box a lesion's grid must reach
    specs: list[tuple[str, str, float, str]] = []  # (kind, texture, size mm, measure)
    room_mm = _FIT * min(width, height) * mpp / 1000.0

    def draw(k: str) -> float:
        lo, hi = _DRAW_MM[k]
        return float(rng.uniform(lo, min(hi, room_mm)))

    if label == 1:
        specs.append((kind, "tumour", draw(kind), "box" if kind == "macro" else "diameter"))
        smaller = [k for k in _TUMOUR_KINDS[_TUMOUR_KINDS.index(kind) :]]
        for _ in range(int(rng.choice([0, 1, 2], p=[0.45, 0.35, 0.2]))):
            k = str(rng.choice(smaller[1:] if len(smaller) > 1 else smaller))
            specs.append((k, "tumour", draw(k), "box" if k == "macro" else "diameter"))
        n_distract = int(rng.choice([0, 1, 2], p=[0.45, 0.35, 0.2]))
    else:
        n_distract = int(rng.choice([0, 1, 2, 3], p=[0.2, 0.35, 0.3, 0.15]))
    for _ in range(n_distract):
        texture = "follicle" if rng.random() < 0.55 else "fold"
        lo, hi = (0.15, 0.9) if texture == "follicle" else (0.4, 2.5)
        hi = min(hi, room_mm)
        if hi <= lo * 0.5:
            continue
        specs.append(("distractor", texture, float(rng.uniform(min(lo, hi * 0.9), hi)), "box"))

    gh, gw = tissue.shape
    out: list[_LesionRender] = []
    for kind_i, texture, size_mm, measure in specs:
        ext, place = _make_lesion(rng, kind_i, texture, size_mm, measure, mpp, reach)
        half = max(ext[2] - ext[0], ext[3] - ext[1]) / 2
        # candidate centres: inside the slide with the box, deep enough in tissue
        xs = (np.arange(gw) + 0.5) * cell
        ys = (np.arange(gh) + 0.5) * cell
        okx = (xs + ext[0] >= 1) & (xs + ext[2] <= width - 1)
        oky = (ys + ext[1] >= 1) & (ys + ext[3] <= height - 1)
        inside = okx[None, :] & oky[:, None]
        chosen = None
        for depth in (0.6 * half, 0.3 * half, 0.0, -np.inf):
            cand = np.argwhere(inside & (tissue >= depth))
            rng.shuffle(cand)
            for iy, ix in cand[:200]:
                x, y = float(xs[ix]), float(ys[iy])
                box = (x + ext[0], y + ext[1], x + ext[2], y + ext[3])
                pad = 0.1 * half + 4 * mpp
                if all(
                    box[2] + pad < o.lesion.box[0]
                    or o.lesion.box[2] + pad < box[0]
                    or box[3] + pad < o.lesion.box[1]
                    or o.lesion.box[3] + pad < box[1]
                    for o in out
                ):
                    chosen = (x, y)
                    break
            if chosen is not None:
                break
        if chosen is None:
            if out:
                continue  # a satellite or distractor that does not fit: leave it out
            # the primary tumour always exists (the spec checked that it fits the slide):
            # centre it when no grid position keeps its box inside the slide
            chosen = (width / 2 - (ext[0] + ext[2]) / 2, height / 2 - (ext[1] + ext[3]) / 2)
        out.append(place(*chosen))
    return out


def _build_plan(spec: SyntheticSlideSpec) -> tuple[_Plan, int, str]:
    """Everything a tile needs: layout, lesions, stain, texture bank; plus label and class.

    Each part draws from its own child of the seed, so that (for example) the label does
    not change the tissue layout.
    """
    seq = np.random.SeedSequence(spec.seed)
    r_label, r_tissue, r_lesion, r_stain, r_tex, r_fields = (
        np.random.default_rng(s) for s in seq.spawn(6)
    )
    feasible = _feasible_kinds(spec.width, spec.height, spec.mpp)
    # label and class
    if spec.lesion_kind is not None:
        kind = spec.lesion_kind
        label = 0 if kind == "negative" else 1
    else:
        label = spec.label if spec.label is not None else int(r_label.random() < 0.5)
        if label == 1 and not feasible:
            label = 0  # only reachable when the label was drawn, not requested
        if label == 1:
            weights = np.array([{"macro": 0.35, "micro": 0.4, "itc": 0.25}[k] for k in feasible])
            kind = str(r_label.choice(feasible, p=weights / weights.sum()))
        else:
            kind = "negative"
    sizes, downs = _level_sizes(spec.width, spec.height)
    cell = _grid_cell(spec.width, spec.height, spec.mpp)
    tissue = _tissue_field(r_tissue, spec.width, spec.height, cell)
    gh, gw = tissue.shape
    scale = max(400.0 / spec.mpp / cell, 0.7)
    # stain variation: mix of the two normal textures (w) and stain strength (s),
    # stored as the weights of texture A (s * (1 - w)) and texture B (s * w)
    mix = _noise(r_fields, (gh, gw), scale) + 0.5 * _noise(r_fields, (gh, gw), 0.25 * scale)
    w = 1.0 / (1.0 + np.exp(-1.5 * mix))
    s = np.clip(1.0 + 0.07 * _noise(r_fields, (gh, gw), 2.5 * scale), 0.82, 1.15)
    wa, wb = (s * (1.0 - w)).astype(np.float32), (s * w).astype(np.float32)
    lesions = _plan_lesions(
        r_lesion, spec.width, spec.height, spec.mpp, label, kind, tissue, cell, downs[-1]
    )
    stain = _draw_stain(r_stain)
    glass = stain.glass
    plan = _Plan(
        width=spec.width,
        height=spec.height,
        mpp=spec.mpp,
        tile=spec.tile,
        quality=spec.quality,
        sizes=sizes,
        downs=downs,
        cell=cell,
        fields=np.stack([tissue, wa, wb]),
        rag_amp=20.0 / spec.mpp,
        lesions=lesions,
        glass_rgb=np.clip(np.rint(glass), 0, 255).astype(np.uint8),
        glass_inv=(255.0 - np.clip(np.rint(glass), 0, 255)).astype(np.float32),
    )
    # texture bank
    tex: dict[str, np.ndarray] = {}
    mpp = spec.mpp
    p_small = _texture_period(mpp)
    p_large = 3 * p_small // 2
    h, e = _tex_normal(r_tex, p_small, mpp, fibrous=False)
    tex["A"] = _inv_uint8(stain.rgb(h, e))
    h, e = _tex_normal(r_tex, p_large, mpp, fibrous=True)
    tex["B"] = _inv_uint8(stain.rgb(h, e))
    h, e = _tex_tumour(r_tex, p_small, mpp)
    tum_rgb = stain.rgb(h, e)
    tex["TA"] = _inv_uint8(tum_rgb)
    h, e = _tex_tumour(r_tex, p_large, mpp)
    tex["TB"] = _inv_uint8(stain.rgb(h, e))
    h, e = _tex_follicle(r_tex, p_small, mpp)
    h, e = _match_mean(stain, h, e, float(tum_rgb.mean()))
    tex["D"] = _inv_uint8(stain.rgb(h, e))
    rag = np.clip(_noise(r_tex, (p_small, p_small), 8.0 / mpp, 40.0 / mpp) / 2.5, -1, 1)
    tex["R"] = np.repeat(np.rint(rag * 127).astype(np.int8)[..., None], 3, axis=2)
    # level textures: d x d block means, each level from the previous one (factor 4);
    # a period that would drop below _MIN_PERIOD_PX becomes the mean colour
    cur: dict[str, np.ndarray] = dict(tex)
    f = _LEVEL_FACTOR
    for i in range(len(downs)):
        level = {}
        for name, base in tex.items():
            if i > 0:
                prev = cur[name]
                q, c = prev.shape[0] // f, prev.shape[2]
                if prev.shape[0] % f == 0 and q >= _MIN_PERIOD_PX:
                    cur[name] = prev.reshape(q, f, q, f, c).mean(axis=(1, 3), dtype=np.float32)
                else:
                    mean = prev.mean(axis=(0, 1), dtype=np.float32)
                    cur[name] = np.broadcast_to(mean, (_MIN_PERIOD_PX, _MIN_PERIOD_PX, c))
            level[name] = _canvas(
                base if i == 0 else np.rint(cur[name]).astype(base.dtype), spec.tile
            )
        plan.canvases.append(level)
    return plan, label, kind


# --------------------------------------------------------------------------------------
# Tile rendering
# --------------------------------------------------------------------------------------


def _axis_weights(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Left sample index and right-sample weight of ``coords`` (grid units), clamped."""
    c = np.clip(coords, 0.0, n - 1.0)
    i0 = np.minimum(c.astype(np.int64), n - 2)
    return i0, (c - i0).astype(np.float32)


def _sample(grid: np.ndarray, cy: np.ndarray, cx: np.ndarray, k: int = 1) -> np.ndarray:
    """Bilinear samples of ``grid`` (>= 2 x 2) at rows ``cy`` x columns ``cx`` (grid units).

    Returns ``(len(cy), k * len(cx))`` float32, each column repeated ``k`` times (``k=3``
    gives an array that multiplies an RGB tile viewed as ``(T, 3T)``). ``cx`` must be
    increasing.
    """
    iy, ty = _axis_weights(cy, grid.shape[0])
    ix, tx = _axis_weights(cx, grid.shape[1])
    r0, r1 = int(iy[0]), int(iy[-1]) + 2
    c0, c1 = int(ix[0]), int(ix[-1]) + 2
    sub = grid[r0:r1, c0:c1]
    iy = iy - r0
    ix = ix - c0
    rows = sub[iy]
    rows += (sub[iy + 1] - rows) * ty[:, None]
    n = cx.size
    starts = np.flatnonzero(np.diff(ix)) + 1
    if starts.size < 48:
        # few grid columns: the result is linear within each, fill it piecewise
        txk = np.repeat(tx, k) if k > 1 else tx
        out = np.empty((cy.size, k * n), np.float32)
        bounds = [0, *starts.tolist(), n]
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            j = int(ix[s0])
            left = rows[:, j : j + 1]
            seg = out[:, k * s0 : k * s1]
            np.multiply(rows[:, j + 1 : j + 2] - left, txk[None, k * s0 : k * s1], out=seg)
            seg += left
        return out
    if k > 1:
        ix = np.repeat(ix, k)
        tx = np.repeat(tx, k)
    out = rows[:, ix]
    out += (rows[:, ix + 1] - out) * tx
    return out


def _block_size(d: int) -> int:
    """Output pixels per sample of the smooth stain fields at downsample ``d``."""
    return {1: 8, 4: 4, 16: 2}.get(d, 1)


def _expand(block: np.ndarray, b: int) -> np.ndarray:
    """(n, n) block samples -> (n*b, 3*n*b), each sample covering b x b RGB pixels."""
    return np.repeat(np.repeat(block, b, axis=0), 3 * b, axis=1)


def _render_tile(plan: _Plan, k: int, ty: int, tx: int) -> np.ndarray | None:
    """Render tile (ty, tx) of level k as (T, T, 3) uint8 RGB, or None for plain glass.

    Works on the tile viewed as (T, 3T) so that every per-pixel weight multiplies a
    same-shaped array (numpy is slow at broadcasting over a trailing axis of 3).
    """
    t = plan.tile
    d = plan.downs[k]
    px0, py0 = tx * t, ty * t
    x0, y0, x1, y1 = px0 * d, py0 * d, (px0 + t) * d, (py0 + t) * d
    edge = max(1.5 * d, 3.0)  # level-0 px over which alpha goes from 0 to 1
    reach = 2.0 * edge + plan.rag_amp
    hits = [
        les
        for les in plan.lesions
        if les.lesion.box[0] - reach < x1
        and les.lesion.box[2] + reach > x0
        and les.lesion.box[1] - reach < y1
        and les.lesion.box[3] + reach > y0
    ]
    tissue = plan.fields[0]
    g = plan.cell
    gh, gw = tissue.shape
    cy0 = min(max(int(math.floor(y0 / g - 0.5)), 0), gh - 1)
    cy1 = min(max(int(math.floor(y1 / g - 0.5)) + 2, 1), gh)
    cx0 = min(max(int(math.floor(x0 / g - 0.5)), 0), gw - 1)
    cx1 = min(max(int(math.floor(x1 / g - 0.5)) + 2, 1), gw)
    block = tissue[cy0:cy1, cx0:cx1]
    margin = plan.rag_amp + edge
    if not hits and float(block.max()) < -margin:
        return None
    full = float(block.min()) > margin

    cv = plan.canvases[k]

    def crop(name: str) -> np.ndarray:
        return cv[name].crop(py0, px0, t).reshape(t, 3 * t)

    # smooth stain weights, sampled every b pixels
    b = _block_size(d)
    cb = (np.arange(t // b, dtype=np.float64) * b + 0.5 * b)
    cby = (py0 + cb) * d / g - 0.5
    cbx = (px0 + cb) * d / g - 0.5
    wa = _expand(_sample(plan.fields[1], cby, cbx), b)
    wb = _expand(_sample(plan.fields[2], cby, cbx), b)
    tis = np.multiply(crop("A"), wa, dtype=np.float32)
    tis += crop("B") * wb

    centres = np.arange(t, dtype=np.float64) + 0.5
    alpha = None
    if not full:
        alpha = _sample(tissue, (py0 + centres) * d / g - 0.5, (px0 + centres) * d / g - 0.5, 3)
        alpha += crop("R") * np.float32(plan.rag_amp / 127.0)
        alpha *= np.float32(1.0 / edge)
        alpha += np.float32(0.5)
        np.clip(alpha, 0.0, 1.0, out=alpha)

    for les in hits:
        bx0, by0, bx1, by1 = les.lesion.box
        sx0 = max(int(math.floor((bx0 - reach) / d)) - px0, 0)
        sx1 = min(int(math.ceil((bx1 + reach) / d)) - px0, t)
        sy0 = max(int(math.floor((by0 - reach) / d)) - py0, 0)
        sy1 = min(int(math.ceil((by1 + reach) / d)) - py0, t)
        if sx1 <= sx0 or sy1 <= sy0:
            continue
        ly = ((py0 + centres[sy0:sy1]) * d - les.oy) / les.cell
        lx = ((px0 + centres[sx0:sx1]) * d - les.ox) / les.cell
        lgh, lgw = les.field.shape
        iy0 = min(max(int(ly[0]), 0), lgh - 2)
        iy1 = min(max(int(ly[-1]), 0), lgh - 2) + 2
        ix0 = min(max(int(lx[0]), 0), lgw - 2)
        ix1 = min(max(int(lx[-1]), 0), lgw - 2) + 2
        lblock = les.field[iy0:iy1, ix0:ix1]
        if float(lblock.max()) < -margin:
            continue
        reg = (slice(sy0, sy1), slice(3 * sx0, 3 * sx1))
        if float(lblock.min()) > margin:
            al: np.ndarray | float = 1.0
        else:
            al = _sample(les.field, ly, lx, 3)
            al += crop("R")[reg] * np.float32(les.rag / 127.0)
            al *= np.float32(1.0 / edge)
            al += np.float32(0.5)
            np.clip(al, 0.0, 1.0, out=al)
        base = tis[reg]
        if les.texture == "tumour":
            lt = np.multiply(crop("TA")[reg], wa[reg], dtype=np.float32)
            lt += crop("TB")[reg] * wb[reg]
        elif les.texture == "follicle":
            lt = np.multiply(crop("D")[reg], wa[reg] + wb[reg], dtype=np.float32)
        else:  # fold: the same tissue doubled over, darker and more saturated
            lt = np.minimum(base * np.float32(1.85), np.float32(245.0))
        if isinstance(al, float):
            base[...] = lt
        else:
            lt -= base
            lt *= al
            base += lt
        if alpha is not None:
            if isinstance(al, float):
                alpha[reg] = 1.0
            else:
                np.maximum(alpha[reg], al, out=alpha[reg])

    if alpha is not None:
        glass = np.tile(plan.glass_inv, t)
        tis -= glass
        tis *= alpha
        tis += glass
    np.subtract(np.float32(255.5), tis, out=tis)
    np.clip(tis, 0.0, 255.0, out=tis)
    return tis.astype(np.uint8).reshape(t, t, 3)


def _encode(tile: np.ndarray, quality: int) -> bytes:
    return imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def _tile_bytes(plan: _Plan, k: int, ty: int, tx: int, glass: bytes) -> bytes:
    tile = _render_tile(plan, k, ty, tx)
    return glass if tile is None else _encode(tile, plan.quality)


def _n_tiles(plan: _Plan, k: int) -> tuple[int, int]:
    lw, lh = plan.sizes[k]
    return -(-lh // plan.tile), -(-lw // plan.tile)


def _ordered(
    plan: _Plan,
    k: int,
    glass: bytes,
    pool: ThreadPoolExecutor | None,
    window: int,
    tick: Callable[[], None],
) -> Iterator[bytes]:
    """Encoded tiles of level k in TIFF order, rendered ahead in the pool."""
    nty, ntx = _n_tiles(plan, k)
    if pool is None:
        for ty in range(nty):
            for tx in range(ntx):
                data = _tile_bytes(plan, k, ty, tx, glass)
                tick()
                yield data
        return
    pending: deque[Future[bytes]] = deque()
    for ty in range(nty):
        for tx in range(ntx):
            pending.append(pool.submit(_tile_bytes, plan, k, ty, tx, glass))
            while len(pending) > window or (pending and pending[0].done()):
                data = pending.popleft().result()
                tick()
                yield data
    while pending:
        data = pending.popleft().result()
        tick()
        yield data


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def _info_to_json(info: SyntheticSlideInfo, spec: SyntheticSlideSpec) -> dict:
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "slide": info.path.name,
        "width": info.width,
        "height": info.height,
        "mpp": info.mpp,
        "seed": info.seed,
        "label": info.label,
        "lesion_kind": info.lesion_kind,
        "lesions": [{"kind": les.kind, "box": list(les.box)} for les in info.lesions],
        "levels": [list(lv) for lv in info.levels],
        "tile": spec.tile,
        "quality": spec.quality,
        "size_ranges_mm": {
            k: [lo, hi if math.isfinite(hi) else None] for k, (lo, hi) in SIZE_RANGES_MM.items()
        },
    }


def generate_slide(
    path: str | os.PathLike[str],
    spec: SyntheticSlideSpec,
    progress: Callable[[int, int], None] | None = None,
    *,
    workers: int | None = None,
) -> SyntheticSlideInfo:
    """Write a synthetic pyramidal JPEG TIFF and its ground-truth sidecar.

    Parameters
    ----------
    path : path-like
        Output slide path (``.tif`` recommended). The file is written to ``<path>.part``
        first and renamed when complete; the sidecar goes to ``<stem>.truth.json``.
    spec : SyntheticSlideSpec
        What to generate. The same spec always gives the same pixels (and the same bytes).
    progress : callable, optional
        Called as ``progress(done, total)`` with tile counts over all levels, from the
        calling thread: once with ``done=0``, then at most about 1000 times, the last with
        ``done == total``. An exception raised by it aborts the generation (use that to
        cancel); it propagates, and neither the slide nor its sidecar is left behind.
    workers : int, optional
        Threads rendering and encoding tiles; default: the number of CPUs (at most 8).
        The output does not depend on it.

    Returns
    -------
    SyntheticSlideInfo
        Geometry, label, class and lesions of the slide.

    Raises
    ------
    ValueError
        If ``spec`` is not a :class:`SyntheticSlideSpec` or ``workers`` < 1.
    """
    if not isinstance(spec, SyntheticSlideSpec):
        raise ValueError(f"spec must be a SyntheticSlideSpec, got {type(spec).__name__}")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    path = Path(path)
    plan, label, kind = _build_plan(spec)
    glass = _encode(np.broadcast_to(plan.glass_rgb, (spec.tile, spec.tile, 3)).copy(), spec.quality)
    total = sum(a * b for a, b in (_n_tiles(plan, k) for k in range(len(plan.sizes))))
    every = max(1, total // 1000)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None and (done % every == 0 or done == total):
            progress(done, total)

    if progress is not None:
        progress(0, total)
    bigtiff = spec.width * spec.height > 2**30
    tmp = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="synthetic") if workers > 1 else None
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for k, (lw, lh) in enumerate(plan.sizes):
                d = plan.downs[k]
                res = 1e4 / (spec.mpp * d)
                tw.write(
                    _ordered(plan, k, glass, pool, 4 * workers + 4, tick),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(spec.tile, spec.tile),
                    photometric="rgb",
                    compression="jpeg",
                    subsampling=(2, 2),
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if k == 0 else 1,
                    description=(
                        f"napari-magnet synthetic slide; seed={spec.seed}; mpp={spec.mpp}"
                        if k == 0
                        else None
                    ),
                    software="napari-magnet",
                    metadata=None,
                )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    info = SyntheticSlideInfo(
        path=path,
        width=spec.width,
        height=spec.height,
        mpp=spec.mpp,
        seed=spec.seed,
        label=label,
        lesion_kind=kind,
        lesions=tuple(les.lesion for les in plan.lesions),
        levels=tuple(plan.sizes),
    )
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + ".part")
    side_tmp.write_text(json.dumps(_info_to_json(info, spec), indent=1) + "\n", encoding="utf-8")
    os.replace(side_tmp, side)
    return info


def read_ground_truth(path: str | os.PathLike[str]) -> SyntheticSlideInfo:
    """Read the ground truth of a synthetic slide from its sidecar JSON.

    Parameters
    ----------
    path : path-like
        The slide (``x.tif``) or its sidecar (``x.truth.json``).

    Returns
    -------
    SyntheticSlideInfo

    Raises
    ------
    FileNotFoundError
        If the sidecar does not exist.
    ValueError
        If the file is not a synthetic-slide sidecar.
    """
    side = sidecar_path(path)
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{side}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{side}: not a napari-magnet synthetic slide sidecar")
    return SyntheticSlideInfo(
        path=side.parent / data["slide"],
        width=int(data["width"]),
        height=int(data["height"]),
        mpp=float(data["mpp"]),
        seed=int(data["seed"]),
        label=int(data["label"]),
        lesion_kind=str(data["lesion_kind"]),
        lesions=tuple(Lesion(les["kind"], tuple(les["box"])) for les in data["lesions"]),
        levels=tuple((int(w), int(h)) for w, h in data["levels"]),
    )


def generate_cohort(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    width: int,
    height: int,
    mpp: float = 0.5,
    *,
    tile: int = 512,
    quality: int = 80,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    positives: Sequence[str] | None = None,
    jobs: int = 1,
) -> list[SyntheticSlideInfo]:
    """Generate ``n`` slides with balanced labels and write ``out_dir/cohort.csv``.

    Labels alternate 0/1 in an order shuffled by ``seed`` (``n // 2`` positives, one more
    negative when ``n`` is odd); positives cycle through the tumour classes that fit the
    slide size (macro, micro, itc), or through ``positives``, in a seed-shuffled order.
    Slide ``i`` is ``out_dir/slide_{i:04d}.tif`` with a seed derived from ``(seed, i)``, so
    a slide does not depend on ``jobs``.

    Parameters
    ----------
    out_dir : path-like
        Output folder (created if needed).
    n : int
        Number of slides (>= 1).
    seed : int
        Cohort seed (>= 0).
    width, height : int
        Level-0 size of every slide.
    mpp : float
        Microns per pixel of every slide.
    tile, quality : int
        TIFF tile side and JPEG quality.
    progress : callable, optional
        ``progress(done, total)`` in slides.
    workers : int, optional
        Threads per slide (see :func:`generate_slide`).
    positives : sequence of str, optional
        The tumour classes positives cycle through; repeat a class to weight it
        (``("micro", "micro", "macro")``: two micro slides for each macro one).
    jobs : int
        Slides generated at once, in separate processes.

    Returns
    -------
    list of SyntheticSlideInfo

    Notes
    -----
    ``cohort.csv`` has the columns ``path`` (relative to ``out_dir``), ``label``,
    ``lesion_class`` (``negative``/``itc``/``micro``/``macro``) and ``lesion_boxes``: a JSON
    list of the tumour lesions' level-0 boxes ``[x0, y0, x1, y1]`` (distractors are not
    listed; they are in each slide's sidecar).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # validates width, height, mpp, tile and quality once, before anything is written
    SyntheticSlideSpec(width, height, mpp, 0, 0, None, tile, quality)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    if isinstance(jobs, bool) or not isinstance(jobs, (int, np.integer)) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    feasible = list(_feasible_kinds(width, height, mpp))
    if positives is not None:
        positives = [str(k) for k in positives]
        unknown = sorted(set(positives) - set(_TUMOUR_KINDS))
        if unknown or not positives:
            raise ValueError(f"positives must name tumour classes {sorted(_TUMOUR_KINDS)}, "
                             f"got {positives}")
        too_big = sorted(set(positives) - set(feasible))
        if too_big:
            raise ValueError(f"a {width}x{height} px slide at {mpp} µm/px is too small for "
                             f"{too_big} lesions; fitting classes: {feasible}")
    labels = np.array([i % 2 for i in range(n)])
    rng.shuffle(labels)
    if feasible:
        order = list(rng.permutation(positives if positives is not None else feasible))
    else:
        labels[:] = 0
        order = []
    specs = []
    n_pos = 0
    for i in range(n):
        label = int(labels[i])
        kind = "negative"
        if label == 1:
            kind = str(order[n_pos % len(order)])
            n_pos += 1
        state = np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint64)
        slide_seed = int(state[0] >> np.uint64(1))  # < 2**63
        specs.append(SyntheticSlideSpec(width, height, mpp, slide_seed, label, kind, tile,
                                        quality))
    paths = [out / f"slide_{i:04d}.tif" for i in range(n)]
    infos: list[SyntheticSlideInfo] = [None] * n  # type: ignore[list-item]
    if jobs == 1:
        for i, spec in enumerate(specs):
            infos[i] = generate_slide(paths[i], spec, workers=workers)
            if progress is not None:
                progress(i + 1, n)
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(min(int(jobs), n)) as pool:
            futures = {pool.submit(generate_slide, paths[i], spec, workers=workers or 1): i
                       for i, spec in enumerate(specs)}
            for done, future in enumerate(as_completed(futures), 1):
                infos[futures[future]] = future.result()
                if progress is not None:
                    progress(done, n)
    rows = [
        {
            "path": info.path.name,
            "label": info.label,
            "lesion_class": info.lesion_kind,
            "lesion_boxes": json.dumps([list(les.box) for les in info.tumour_lesions]),
        }
        for info in infos
    ]
    with open(out / "cohort.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "lesion_class", "lesion_boxes"])
        writer.writeheader()
        writer.writerows(rows)
    return infos
