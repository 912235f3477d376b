"""Periodic H&E-like textures: noise, nuclei, stain vectors, and the per-slide texture bank.

Texture comes from a small bank of *periodic* textures (periods of about 0.5 mm) built once
per slide with FFT-filtered noise and blobs. A tile's texture is a plain slice of the bank at
the tile's global position, so neighbouring tiles join without seams. Lower pyramid levels
use block means of the bank, so their mean colours match the downsampled level 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .spec import LEVEL_FACTOR

__all__ = ["Stain", "Canvas", "noise", "draw_stain", "texture_bank"]

# Texture periods: about 0.5 mm, in level-0 pixels a power of two between 256 and 1024 (the
# second texture of each kind has 1.5 times that period, so their mix repeats only every
# 3 periods). Block means are exact while period / downsample is an integer >=
# _MIN_PERIOD_PX; coarser levels use the mean colour.
_PERIOD_UM = 512.0
_PERIOD_RANGE = (256, 1024)
_MIN_PERIOD_PX = 16  # below this a level's texture is its mean colour


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


def noise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    sigma: float,
    sigma_hi: float | None = None,
    aniso: tuple[float, float] | None = None,
) -> np.ndarray:
    """Periodic Gaussian-filtered white noise, zero mean, unit std.

    The noise is synthesised directly in the Fourier domain (one inverse FFT).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the white noise.
    shape : (int, int)
        Output shape; the result wraps around both axes.
    sigma : float
        Smoothing length in pixels.
    sigma_hi : float, optional
        Makes the result band-pass: smoothed at ``sigma`` minus smoothed at ``sigma_hi``.
    aniso : (float, float), optional
        ``(ratio, angle)``: smoothing ``sigma * ratio`` along ``angle`` (radians) and
        ``sigma`` across it.

    Returns
    -------
    numpy.ndarray
        float32 array of ``shape``.
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


# Stain concentrations (H = haematoxylin, E = eosin) of the periodic textures


def _tex_normal(
    rng: np.random.Generator, size: int, mpp: float, fibrous: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Normal lymph-node/stroma tissue: small round lymphocytes, spindle nuclei, fibres."""
    um = 1.0 / mpp
    lymph = _blobs(rng, size, _count(1600 if fibrous else 4200, size, mpp), 3.3 * um, (0.75, 1.25))
    spindle = _blobs(
        rng, size, _count(900 if fibrous else 450, size, mpp), 2.0 * um, (0.8, 1.2), elong=3.0
    )
    nuc = np.maximum(_soft(lymph, 0.5, 0.25), _soft(spindle, 0.5, 0.25))
    fib = noise(rng, (size, size), 1.5 * um, aniso=(5.0 if fibrous else 3.0, rng.uniform(0, 3.14)))
    # (no rare, conspicuous features such as fat cells: the texture repeats with its
    # period, and only a statistically uniform texture hides that at low magnification)
    e = (0.36 if fibrous else 0.30) + (0.13 if fibrous else 0.09) * fib
    chrom = noise(rng, (size, size), 0.6 * um)
    h = 0.035 + nuc * (0.85 + 0.12 * chrom)
    e = np.clip(e * (1.0 - 0.55 * nuc), 0.02, None)
    return h.astype(np.float32), e.astype(np.float32)


def _tex_tumour(rng: np.random.Generator, size: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Carcinoma metastasis: cohesive nests of large, pleomorphic, vesicular nuclei."""
    um = 1.0 / mpp
    nests = noise(rng, (size, size), 22.0 * um)
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
    field += 0.22 * noise(rng, (size, size), 1.2 * um)  # irregular nuclear outlines
    nuc = _soft(field, 0.5, 0.3)
    core = _soft(field, 3.0, 1.5)  # pale centre: vesicular chromatin
    chrom = noise(rng, (size, size), 0.7 * um)
    nucleoli = _soft(_blobs(rng, size, _count(3500, size, mpp), 1.1 * um), 0.5, 0.3) * core
    h = 0.03 + 0.14 * (1.0 - stroma) + nuc * (1.05 + 0.2 * chrom) - 0.3 * core + 0.7 * nucleoli
    e = 0.27 + 0.05 * noise(rng, (size, size), 2.0 * um) + 0.25 * stroma
    e = np.clip(e * (1.0 - 0.45 * nuc), 0.02, None)
    return h.astype(np.float32), e.astype(np.float32)


def _tex_follicle(rng: np.random.Generator, size: int, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """Distractor: packed, uniform small lymphocytes (a dense follicle)."""
    um = 1.0 / mpp
    lymph = _blobs(rng, size, _count(1e6 / 8.0**2, size, mpp), 2.9 * um, (0.85, 1.15), jitter=0.3)
    nuc = _soft(lymph, 0.5, 0.25)
    chrom = noise(rng, (size, size), 0.6 * um)
    h = 0.06 + nuc * (1.0 + 0.1 * chrom)
    e = np.clip(0.16 + 0.04 * noise(rng, (size, size), 3.0 * um) - 0.08 * nuc, 0.02, None)
    return h.astype(np.float32), e.astype(np.float32)


@dataclass
class Stain:
    """Optical densities of one slide's stains and glass (Beer-Lambert colour model).

    Attributes
    ----------
    h, e : numpy.ndarray
        (3,) RGB optical density per unit of haematoxylin and of eosin.
    bg : numpy.ndarray
        (3,) RGB optical density of the glass.
    """

    h: np.ndarray
    e: np.ndarray
    bg: np.ndarray

    def rgb(self, h: np.ndarray, e: np.ndarray) -> np.ndarray:
        """RGB (0-255 floats, shape ``h.shape + (3,)``) of stain concentrations ``h``, ``e``."""
        od = h[..., None] * self.h + e[..., None] * self.e + self.bg
        return 255.0 * np.exp(-od)

    @property
    def glass(self) -> np.ndarray:
        """RGB (0-255 floats) of bare glass."""
        return 255.0 * np.exp(-self.bg)


def draw_stain(rng: np.random.Generator) -> Stain:
    """Draw a slide's stain vectors, stain strengths and glass tone.

    Parameters
    ----------
    rng : numpy.random.Generator

    Returns
    -------
    Stain
    """

    def unit(v: np.ndarray) -> np.ndarray:
        v = np.clip(v, 0.01, None)
        return v / np.linalg.norm(v)

    h = unit(np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.04, 3)) * rng.uniform(0.8, 1.25)
    e = unit(np.array([0.07, 0.99, 0.11]) + rng.normal(0, 0.04, 3)) * rng.uniform(0.7, 1.3)
    bg = np.clip(rng.uniform(0.015, 0.06) + rng.normal(0, 0.003, 3), 0.004, None)
    return Stain(h.astype(np.float32), e.astype(np.float32), bg.astype(np.float32))


def _inv_uint8(rgb: np.ndarray) -> np.ndarray:
    """Store textures as 255 - RGB ("absorbance"), so that blends scale towards glass."""
    return np.clip(np.rint(255.0 - rgb), 0, 255).astype(np.uint8)


def _match_mean(
    stain: Stain, h: np.ndarray, e: np.ndarray, target_mean: float
) -> tuple[np.ndarray, np.ndarray]:
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
class Canvas:
    """A periodic texture at one level, extended by one tile so any tile is a slice.

    Attributes
    ----------
    data : numpy.ndarray
        ``(period + T, period + T[, 3])`` texture, T the tile side.
    period : int
        Period of the texture in this level's pixels.
    """

    data: np.ndarray
    period: int

    def crop(self, y0: int, x0: int, t: int) -> np.ndarray:
        """The ``t`` x ``t`` texture of the tile whose top-left pixel is ``(y0, x0)``."""
        oy, ox = y0 % self.period, x0 % self.period
        return self.data[oy : oy + t, ox : ox + t]


def _canvas(tex: np.ndarray, t: int) -> Canvas:
    """A periodic (p, p, c) texture extended by one tile, so that any tile is a slice."""
    p = tex.shape[0]
    reps = -(-(p + t) // p)
    big = np.tile(tex, (reps, reps, 1))[: p + t, : p + t]
    return Canvas(np.ascontiguousarray(big), p)


def _texture_period(mpp: float) -> int:
    """Period (level-0 px) of the smaller textures of the bank at ``mpp``."""
    p = 1 << int(round(math.log2(_PERIOD_UM / mpp)))
    return int(min(max(p, _PERIOD_RANGE[0]), _PERIOD_RANGE[1]))


def texture_bank(
    rng: np.random.Generator, stain: Stain, mpp: float, n_levels: int, tile: int
) -> list[dict[str, Canvas]]:
    """Build a slide's texture bank at every pyramid level.

    Parameters
    ----------
    rng : numpy.random.Generator
        Used for the textures only (in a fixed order, so the bank depends on its seed alone).
    stain : Stain
        The slide's stain.
    mpp : float
        Microns per level-0 pixel.
    n_levels : int
        Pyramid levels (downsample ``LEVEL_FACTOR ** i`` for level ``i``).
    tile : int
        Tile side in pixels.

    Returns
    -------
    list of dict
        Per level, ``{name: Canvas}`` of inverted-RGB uint8 textures: ``"A"``, ``"B"``
        (normal tissue), ``"TA"``, ``"TB"`` (tumour), ``"D"`` (follicle distractor, with the
        tumour's mean colour), and ``"R"`` (int8 band-pass noise for ragged borders).
    """
    tex: dict[str, np.ndarray] = {}
    p_small = _texture_period(mpp)
    p_large = 3 * p_small // 2
    h, e = _tex_normal(rng, p_small, mpp, fibrous=False)
    tex["A"] = _inv_uint8(stain.rgb(h, e))
    h, e = _tex_normal(rng, p_large, mpp, fibrous=True)
    tex["B"] = _inv_uint8(stain.rgb(h, e))
    h, e = _tex_tumour(rng, p_small, mpp)
    tum_rgb = stain.rgb(h, e)
    tex["TA"] = _inv_uint8(tum_rgb)
    h, e = _tex_tumour(rng, p_large, mpp)
    tex["TB"] = _inv_uint8(stain.rgb(h, e))
    h, e = _tex_follicle(rng, p_small, mpp)
    h, e = _match_mean(stain, h, e, float(tum_rgb.mean()))
    tex["D"] = _inv_uint8(stain.rgb(h, e))
    rag = np.clip(noise(rng, (p_small, p_small), 8.0 / mpp, 40.0 / mpp) / 2.5, -1, 1)
    tex["R"] = np.repeat(np.rint(rag * 127).astype(np.int8)[..., None], 3, axis=2)
    # level textures: d x d block means, each level from the previous one (factor 4);
    # a period that would drop below _MIN_PERIOD_PX becomes the mean colour
    cur: dict[str, np.ndarray] = dict(tex)
    f = LEVEL_FACTOR
    levels: list[dict[str, Canvas]] = []
    for i in range(n_levels):
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
            level[name] = _canvas(base if i == 0 else np.rint(cur[name]).astype(base.dtype), tile)
        levels.append(level)
    return levels
