"""Slide layout: tissue pieces, stain-variation fields and lesions, on coarse grids.

The slide is described at coarse resolution only: a tissue level-set field on a grid of
about 32 µm cells, two smooth stain-variation fields, and one small level-set grid per
lesion. Nothing of a full level is ever held in memory; :mod:`.rendering` turns the
:class:`Plan` into tiles.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .spec import (
    DRAW_MM,
    FIT,
    TUMOUR_KINDS,
    Lesion,
    SyntheticSlideSpec,
    feasible_kinds,
    level_sizes,
)
from .textures import Canvas, draw_stain, noise, texture_bank

__all__ = ["LesionRender", "Plan", "build_plan", "lesion_layout"]


@dataclass
class LesionRender:
    """A placed lesion and its own level-set grid.

    Attributes
    ----------
    lesion : Lesion
        Its kind and level-0 box (the ground truth).
    texture : str
        ``"tumour"``, ``"follicle"`` or ``"fold"``.
    ox, oy : float
        Level-0 position of grid sample (0, 0).
    cell : float
        Level-0 pixels between grid samples.
    field : numpy.ndarray
        (gh, gw) float32 approximate signed distance in level-0 px, > 0 inside.
    rag : float
        Amplitude (level-0 px) of the ragged border.
    """

    lesion: Lesion
    texture: str
    ox: float
    oy: float
    cell: float
    field: np.ndarray
    rag: float


@dataclass
class Plan:
    """Everything a tile needs: geometry, coarse fields, lesions, glass colour, textures.

    Attributes
    ----------
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Microns per level-0 pixel.
    tile, quality : int
        TIFF tile side and JPEG quality.
    sizes : list of (int, int)
        ``(width, height)`` of each pyramid level.
    downs : list of int
        Downsample of each pyramid level.
    cell : int
        Level-0 px per coarse grid cell.
    fields : numpy.ndarray
        (3, gh, gw): tissue signed distance (px), weights of texture A and of texture B.
    rag_amp : float
        Amplitude (px) of the ragged tissue border.
    lesions : list of LesionRender
    glass_rgb : numpy.ndarray
        (3,) uint8 colour of glass.
    glass_inv : numpy.ndarray
        (3,) float32 ``255 - glass_rgb``.
    canvases : list of dict
        The texture bank per level (see :func:`.textures.texture_bank`).
    """

    width: int
    height: int
    mpp: float
    tile: int
    quality: int
    sizes: list[tuple[int, int]]
    downs: list[int]
    cell: int
    fields: np.ndarray
    rag_amp: float
    lesions: list[LesionRender]
    glass_rgb: np.ndarray
    glass_inv: np.ndarray
    canvases: list[dict[str, Canvas]] = field(default_factory=list)


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
    n1 = noise(rng, (gh, gw), max(0.07 * scale_cells, 0.7))
    n2 = noise(rng, (gh, gw), max(0.02 * scale_cells, 0.5))
    n3 = noise(rng, (gh, gw), max(0.006 * scale_cells, 0.5))
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
) -> tuple[tuple[float, float, float, float], Callable[[float, float], LesionRender]]:
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

    def place(x: float, y: float) -> LesionRender:
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
        return LesionRender(Lesion(kind, box), texture, ox, oy, cell, fld, rag)

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
) -> list[LesionRender]:
    """Draw and place the tumour lesions and distractors of a slide."""
    reach = 3.0 * 1.5 * max_down  # how far beyond its box a lesion's grid must reach
    specs: list[tuple[str, str, float, str]] = []  # (kind, texture, size mm, measure)
    room_mm = FIT * min(width, height) * mpp / 1000.0

    def draw(k: str) -> float:
        lo, hi = DRAW_MM[k]
        return float(rng.uniform(lo, min(hi, room_mm)))

    if label == 1:
        specs.append((kind, "tumour", draw(kind), "box" if kind == "macro" else "diameter"))
        smaller = [k for k in TUMOUR_KINDS[TUMOUR_KINDS.index(kind) :]]
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
    out: list[LesionRender] = []
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


def lesion_layout(
    width: int, height: int, mpp: float, seed: int, label: int, kind: str
) -> list[LesionRender]:
    """The lesions of a generated slide, laid out again exactly as :func:`build_plan` did.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.
    mpp : float
        µm per level-0 pixel.
    seed : int
        The slide's seed.
    label : int
        1 if the slide carries tumour, else 0.
    kind : str
        Its class (``"macro"``, ``"micro"``, ``"itc"`` or ``"negative"``).

    Returns
    -------
    list of LesionRender
        Every lesion (tumour and distractors) with its outline grid.
    """
    _, r_tissue, r_lesion, *_ = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)
    )
    downs = level_sizes(width, height)[1]
    cell = _grid_cell(width, height, mpp)
    tissue = _tissue_field(r_tissue, width, height, cell)
    return _plan_lesions(r_lesion, width, height, mpp, label, kind, tissue, cell, downs[-1])


def build_plan(spec: SyntheticSlideSpec) -> tuple[Plan, int, str]:
    """Lay out a slide: tissue, stain fields, lesions, stain and texture bank.

    Each part draws from its own child of the seed, so that (for example) the label does
    not change the tissue layout.

    Parameters
    ----------
    spec : SyntheticSlideSpec

    Returns
    -------
    plan : Plan
        Everything a tile needs.
    label : int
        1 if the slide carries tumour, else 0.
    kind : str
        Slide class: ``"macro"``, ``"micro"``, ``"itc"`` or ``"negative"``.
    """
    seq = np.random.SeedSequence(spec.seed)
    r_label, r_tissue, r_lesion, r_stain, r_tex, r_fields = (
        np.random.default_rng(s) for s in seq.spawn(6)
    )
    feasible = feasible_kinds(spec.width, spec.height, spec.mpp)
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
    sizes, downs = level_sizes(spec.width, spec.height)
    cell = _grid_cell(spec.width, spec.height, spec.mpp)
    tissue = _tissue_field(r_tissue, spec.width, spec.height, cell)
    gh, gw = tissue.shape
    scale = max(400.0 / spec.mpp / cell, 0.7)
    # stain variation: mix of the two normal textures (w) and stain strength (s),
    # stored as the weights of texture A (s * (1 - w)) and texture B (s * w)
    mix = noise(r_fields, (gh, gw), scale) + 0.5 * noise(r_fields, (gh, gw), 0.25 * scale)
    w = 1.0 / (1.0 + np.exp(-1.5 * mix))
    s = np.clip(1.0 + 0.07 * noise(r_fields, (gh, gw), 2.5 * scale), 0.82, 1.15)
    wa, wb = (s * (1.0 - w)).astype(np.float32), (s * w).astype(np.float32)
    lesions = _plan_lesions(
        r_lesion, spec.width, spec.height, spec.mpp, label, kind, tissue, cell, downs[-1]
    )
    stain = draw_stain(r_stain)
    glass = stain.glass
    plan = Plan(
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
        canvases=texture_bank(r_tex, stain, spec.mpp, len(downs), spec.tile),
    )
    return plan, label, kind
