"""Tile rendering: a :class:`~.layout.Plan` to JPEG tiles, one tile at a time.

Each tile is rendered independently: bilinear interpolation of the coarse fields, a few
numpy blends on the tile viewed as (T, 3T), then JPEG encoding, in a thread pool (numpy and
libjpeg-turbo release the GIL). Glass tiles are encoded once and their bytes reused. Lower
pyramid levels are rendered at their own resolution from the same plan (with block-averaged
textures), not by downsampling level 0.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import imagecodecs
import numpy as np

from .layout import Plan

__all__ = ["render_tile", "encode_tile", "tile_grid", "encoded_tiles"]


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


def render_tile(plan: Plan, k: int, ty: int, tx: int) -> np.ndarray | None:
    """Render one tile of one pyramid level.

    Works on the tile viewed as (T, 3T) so that every per-pixel weight multiplies a
    same-shaped array (numpy is slow at broadcasting over a trailing axis of 3).

    Parameters
    ----------
    plan : Plan
        The slide's layout (see :func:`.layout.build_plan`).
    k : int
        Pyramid level.
    ty, tx : int
        Tile row and column in that level.

    Returns
    -------
    numpy.ndarray or None
        (T, T, 3) uint8 RGB, or None when the tile is plain glass.
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
    cb = np.arange(t // b, dtype=np.float64) * b + 0.5 * b
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


def encode_tile(tile: np.ndarray, quality: int) -> bytes:
    """JPEG-encode an RGB tile as YCbCr 4:2:0, the form the TIFF's JPEG tiles take.

    Parameters
    ----------
    tile : numpy.ndarray
        (T, T, 3) uint8 RGB.
    quality : int
        JPEG quality, 1 to 100.

    Returns
    -------
    bytes
    """
    return imagecodecs.jpeg8_encode(
        tile, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def _tile_bytes(plan: Plan, k: int, ty: int, tx: int, glass: bytes) -> bytes:
    tile = render_tile(plan, k, ty, tx)
    return glass if tile is None else encode_tile(tile, plan.quality)


def tile_grid(plan: Plan, k: int) -> tuple[int, int]:
    """Tile rows and columns of pyramid level ``k``.

    Parameters
    ----------
    plan : Plan
    k : int
        Pyramid level.

    Returns
    -------
    (int, int)
        ``(rows, columns)``, partial tiles included.
    """
    lw, lh = plan.sizes[k]
    return -(-lh // plan.tile), -(-lw // plan.tile)


def encoded_tiles(
    plan: Plan,
    k: int,
    glass: bytes,
    pool: ThreadPoolExecutor | None,
    window: int,
    tick: Callable[[], None],
) -> Iterator[bytes]:
    """Encoded tiles of level ``k`` in TIFF order (row by row), rendered ahead in a pool.

    Parameters
    ----------
    plan : Plan
    k : int
        Pyramid level.
    glass : bytes
        The encoded plain-glass tile, yielded for every tile without tissue.
    pool : ThreadPoolExecutor or None
        Threads rendering and encoding tiles; None renders in the calling thread.
    window : int
        At most this many tiles are rendered ahead of the consumer.
    tick : callable
        Called once per yielded tile, from the consuming thread.

    Yields
    ------
    bytes
        One JPEG tile; the order does not depend on ``pool``.
    """
    nty, ntx = tile_grid(plan, k)
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
