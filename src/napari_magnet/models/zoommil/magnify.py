"""ZoomMIL through the ``magnify`` stream (DESIGN §6, §9): embed only what the model selects.

From the slide's own pixel size the magnifications are planned (:func:`~napari_magnet.bags.
grid.plan_magnifications`), the tissue mask computed and the nested grid laid out exactly as
``napari-magnet patch`` would (:func:`slide_grid`); the first bag is the coarse patches with
enough tissue that overlap the visible box. Its features are embedded through the run's
:class:`~napari_magnet.engine.regions.RegionReader` with the model's own encoder — or read
from a bag file ``<slide stem>.h5`` beside the slide when that file holds first-level
features of the same grid made by the same encoder. Then the model zooms
(:meth:`ZoomMIL.zoom`) and its ``children`` callback embeds **only the children of the
selected patches**: an evaluation run embeds ``N0 + Σ K_m c_m`` patches
(:func:`~.model.bag_sizes`), not the whole grid.

One ``MagnifyStep`` per magnification, yielded as soon as the model has looked at it (before
the next magnification is embedded):

* regions: the ``K`` patches selected to zoom into; at the last magnification the ``K``
  patches of highest attention (``K`` of the previous step, 8 for a one-magnification model);
* ids: ``"1"``…``"K"`` by descending score at the first step, then ``"<parent>.<j>"`` with
  ``j`` the rank among that parent's selected children (parent: the selected patch of the
  previous step it is a child of);
* attention maps: the first step's over the coarse grid around the bag (0 where no patch),
  later steps' one ``r × r`` map per parent over the parent's box;
* scales: the patch's side over the frame's at the first step, ``1 / r`` after.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import torch

from ...bags.bagfile import BagError, bag_kind, read_bag
from ...bags.embedding import embed_level, fill_outside
from ...bags.encoders import Encoder
from ...bags.grid import MagnificationPlan, nested_grid, plan_magnifications
from ...bags.records import BagLevel
from ...bags.tissue import slide_tissue_mask
from ...engine.frames import clip_boxes
from ...engine.types import MagnifyOptions, MagnifyResult, MagnifyStep
from .model import ZoomLevel, ZoomMIL, encoder_mismatch

__all__ = ["first_bag_rows", "magnify_zoommil", "slide_grid", "stored_first_features"]

#: Patches shown at the last step of a one-magnification model (ABMIL).
LAST_STEP_PATCHES = 8


def slide_grid(slide: Any, config: Any) -> tuple[tuple[MagnificationPlan, ...], tuple]:
    """The plans and the nested grid of a slide for a ZoomMIL configuration.

    Parameters
    ----------
    slide : Slide
        An open slide that records its pixel size.
    config : ZoomMILConfig
        ``mpps``, ``patch_size`` and ``min_tissue`` are used (tissue mask: default options).

    Returns
    -------
    (tuple of MagnificationPlan, tuple of BagLevel)
        Coarsest first; the first level holds the coarse patches with enough tissue, each
        finer one all children of the previous one (as ``napari-magnet patch`` writes them).

    Raises
    ------
    ValueError
        The slide records no pixel size, or a magnification is finer than the slide's.
    """
    if slide.mpp is None:
        raise ValueError(
            f"{slide.name}: ZoomMIL needs the slide's pixel size (µm per pixel) to find its "
            f"magnifications ({', '.join(f'{m:g}' for m in config.mpps)} µm per pixel), and "
            f"the file records none"
        )
    plans = plan_magnifications(slide.geometry, slide.mpp, config.mpps, config.patch_size)
    mask = slide_tissue_mask(slide)
    return plans, nested_grid(plans, slide.dimensions, mask, config.min_tissue)


def first_bag_rows(level: BagLevel, box: np.ndarray) -> np.ndarray:
    """Rows of ``level`` whose patches overlap the level-0 ``box`` (positive area)."""
    boxes = level.boxes()
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box).reshape(4))
    inside = (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)
    return np.flatnonzero(inside)


def _encoder(model: ZoomMIL) -> Encoder:
    cfg = model.config
    return Encoder(cfg.encoder, model.encoder, cfg.feature_dim, config=model.encoder_config)


def stored_first_features(slide: Any, model: ZoomMIL, first: BagLevel) -> np.ndarray | None:
    """First-level features from ``<slide stem>.h5`` beside the slide, when they fit.

    They fit when the file is one of our bags with the model's magnifications and patch
    size, its first level has exactly the coordinates of ``first`` (the grid just computed)
    and its features were made by the model's encoder (same configuration hash, or the same
    encoder name and weights hash). Anything else — no file, another layout, a damaged
    file — gives ``None`` and the features are computed.

    Returns
    -------
    np.ndarray or None
        ``(len(first), D)`` float32, rows in ``first``'s order.
    """
    import h5py

    cfg = model.config
    path = slide.requested_path.parent / f"{slide.name}.h5"
    if not path.is_file() or bag_kind(path) != "napari-magnet":
        return None
    try:
        bag = read_bag(path, features=False)
        mpps = bag.mpps
        if len(mpps) != cfg.steps or any(
            m is None or abs(m - want) > 1e-6 * want for m, want in zip(mpps, cfg.mpps)
        ):
            return None
        level = bag.levels[0]
        if level.patch_size != cfg.patch_size or not np.array_equal(level.coords, first.coords):
            return None
        attrs = dict(level.attrs.get("features_attrs") or {})
        if not attrs or encoder_mismatch(attrs, model.config.encoder, model.encoder_config):
            return None
        with h5py.File(path, "r") as f:
            features = np.asarray(f[level.name]["features"][()], dtype=np.float32)
    except (BagError, OSError, KeyError, ValueError, TypeError):
        return None
    if features.shape != (len(first), cfg.feature_dim):
        return None
    return features


class _Patches:
    """The run's patches: the first bag (rows of the grid's first level) and, below it, the
    children of each selected patch — model indices mapped to grid rows, embedded on demand."""

    def __init__(self, model: ZoomMIL, reader: Any, plans, levels, rows: np.ndarray, dev):
        self.model, self.reader, self.plans, self.levels = model, reader, plans, levels
        self.rows = rows
        self.dev = dev
        self.encoder = _encoder(model)
        self.batch_size = 256 if dev.type == "cuda" else 64
        self.embedded = [0] * len(levels)

    def fan(self, m: int) -> int:
        """Children per patch of magnification ``m`` at ``m + 1``."""
        return self.plans[m + 1].fan_out ** 2

    def grid_rows(self, m: int, index: np.ndarray) -> np.ndarray:
        """Rows of the grid's level ``m`` of the model's global indices at ``m``."""
        index = np.asarray(index, dtype=np.int64)
        if m == 0:
            return self.rows[index]
        parent, j = np.divmod(index, self.fan(m - 1))
        return self.grid_rows(m - 1, parent) * self.fan(m - 1) + j

    def boxes(self, m: int, index: np.ndarray) -> np.ndarray:
        """``(n, 4)`` level-0 boxes of the model's global indices at ``m``."""
        level = self.levels[m]
        xy = level.coords[self.grid_rows(m, index)].astype(np.float64)
        return np.concatenate([xy, xy + np.asarray(level.extent)], axis=1)

    def embed(self, m: int, index: np.ndarray) -> np.ndarray:
        """Features of the model's global indices at ``m`` (the encoder on the slide)."""
        full = self.levels[m]
        part = BagLevel(
            name=full.name,
            coords=full.coords[self.grid_rows(m, index)],
            extent=full.extent,
            patch_size=full.patch_size,
            mpp=full.mpp,
            patch_level=full.patch_level,
            downsample=full.downsample,
        )
        self.embedded[m] += len(part)
        return embed_level(self.reader, part, self.encoder, self.batch_size)

    def children(self, m: int, members: torch.Tensor) -> torch.Tensor:
        """The model's ``children(m, members)``: embeds those children only."""
        c = self.fan(m)
        index = members.detach().cpu().numpy().astype(np.int64)
        child = (index[:, None] * c + np.arange(c)).reshape(-1)
        features = torch.from_numpy(self.embed(m + 1, child)).to(self.dev)
        return features.reshape(len(index), c, -1)

    def images(self, boxes: np.ndarray, size: int) -> np.ndarray:
        """``(n, size, size, 3)`` uint8: the patches as the encoder saw them."""
        pixels = self.reader.read(boxes, size).pixels
        fill_outside(pixels, boxes, self.reader.slide.dimensions, self.reader.slide.background)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()


def _lineage(positions: np.ndarray, fan: int, parent_ids: list[str]) -> tuple[list, list]:
    """Ids ``"<parent>.<j>"`` of bag positions, ``j`` the rank among the parent's picks."""
    ids, parents, seen = [], [], {}
    for position in positions:
        parent = parent_ids[int(position) // fan]
        seen[parent] = seen.get(parent, 0) + 1
        ids.append(f"{parent}.{seen[parent]}")
        parents.append(parent)
    return ids, parents


def _first_map(grid: np.ndarray, extent: tuple, attention: np.ndarray):
    """The first step's attention over the coarse grid around the bag, and its box."""
    lo, hi = grid.min(axis=0), grid.max(axis=0)
    cols, rows = hi - lo + 1
    amap = np.zeros((rows, cols), dtype=np.float32)
    amap[grid[:, 1] - lo[1], grid[:, 0] - lo[0]] = attention
    ex, ey = extent
    box = np.array([[lo[0] * ex, lo[1] * ey, (hi[0] + 1) * ex, (hi[1] + 1) * ey]])
    return amap, box


def magnify_zoommil(
    model: ZoomMIL,
    reader: Any,
    frames: np.ndarray,
    visible: np.ndarray,
    dev: torch.device,
    options: MagnifyOptions,
) -> Generator[MagnifyStep, None, MagnifyResult]:
    """The ZoomMIL family's run through :func:`~napari_magnet.engine.magnify.magnify`.

    Parameters
    ----------
    model : ZoomMIL
        In eval mode, on ``dev``.
    reader : RegionReader
        The slide's reader (patches are read through it, on ``dev``).
    frames, visible : np.ndarray
        ``(1, 4)`` level-0 square frame and the visible box: only coarse patches that
        overlap the visible box make the first bag.
    dev : torch.device
        Where the model runs.
    options : MagnifyOptions
        ``keep_patches`` is used (the model does not sample: ``seed`` plays no part).

    Yields
    ------
    MagnifyStep
        One per magnification (see the module notes).

    Returns
    -------
    MagnifyResult
        The probability of the last class; ``pixels_processed`` counts the patches whose
        features the prediction used (embedded now, or read from a bag file), × patch
        side² × 3.

    Raises
    ------
    ValueError
        The slide records no pixel size, or the region holds no tissue patch.
    """
    cfg = model.config
    slide = reader.slide
    plans, levels = slide_grid(slide, cfg)
    box = np.asarray(visible, dtype=np.float64).reshape(-1, 4)[0]
    frame = np.asarray(frames, dtype=np.float64).reshape(-1, 4)[0]
    rows = first_bag_rows(levels[0], box)
    if len(rows) == 0:
        raise ValueError(
            f"{slide.name}: no patch at {cfg.mpps[0]:g} µm per pixel holds tissue (at least "
            f"{cfg.min_tissue:.0%}) in the region; ZoomMIL has nothing to look at"
        )
    patches = _Patches(model, reader, plans, levels, rows, dev)
    stored = stored_first_features(slide, model, levels[0])
    if stored is not None:
        first = stored[rows]
        patches.embedded[0] += len(rows)
    else:
        first = patches.embed(0, np.arange(len(rows)))
    stream = model.zoom(torch.from_numpy(first).to(dev), patches.children)
    ids: list[str] = []
    parent_boxes = np.zeros((0, 4))
    m = 0
    while True:
        try:
            level = next(stream)
        except StopIteration as stop:
            out = stop.value
            break
        step, ids, parent_boxes = _step(
            m, level, ids, parent_boxes, patches, frame, box, options.keep_patches
        )
        yield step
        m += 1
    probability = float(torch.softmax(out.logits.float(), dim=1)[0, -1])
    return MagnifyResult(
        probability=probability,
        label=int(probability >= 0.5),
        pixels_processed=int(sum(patches.embedded) * cfg.patch_size**2 * 3),
        pixels_read=0,
        seconds=0.0,
        model_name=getattr(model, "model_name", cfg.name),
        checkpoint_sha256=getattr(model, "checkpoint_sha256", ""),
        config_hash=cfg.config_hash(),
    )


def _step(
    m: int,
    level: ZoomLevel,
    previous_ids: list[str],
    parent_boxes: np.ndarray,
    patches: _Patches,
    frame: np.ndarray,
    box: np.ndarray,
    keep: bool,
) -> tuple[MagnifyStep, list[str], np.ndarray]:
    """Magnification ``m``'s step, its region ids and its regions' (unclipped) boxes."""
    cfg = patches.model.config
    attention = level.attention.detach().float().cpu().numpy()
    if level.selected is not None:
        positions = level.selected.detach().cpu().numpy()
    else:
        k = len(previous_ids) if m > 0 else LAST_STEP_PATCHES
        k = min(k, len(attention))
        positions = np.argsort(-attention, kind="stable")[:k]
    members = level.members.detach().cpu().numpy()[positions]
    boxes = patches.boxes(m, members)
    plan = patches.plans[m]
    if m == 0:
        ids = [str(i + 1) for i in range(len(positions))]
        parents = [""] * len(ids)
        grid = patches.levels[0].grid[patches.rows]
        amap, map_box = _first_map(grid, plan.extent, attention)
        maps, map_boxes = [amap], map_box
        scales = np.full(len(ids), plan.extent[0] / (frame[2] - frame[0]))
    else:
        fan = patches.fan(m - 1)
        ids, parents = _lineage(positions, fan, previous_ids)
        r = plan.fan_out
        maps = [attention[a * fan : (a + 1) * fan].reshape(r, r) for a in range(len(parent_boxes))]
        map_boxes = parent_boxes.copy()
        scales = np.full(len(ids), 1.0 / r)
    step = MagnifyStep(
        layer=m + 1,
        region_ids=ids,
        parent_ids=parents,
        boxes=clip_boxes(boxes, box),
        levels=np.full(len(ids), plan.patch_level, dtype=np.int64),
        attention_maps=maps,
        attention_boxes=map_boxes,
        attention_mass=attention[positions].astype(float),
        scales=scales,
        aux_probability=None,
        patches=patches.images(boxes, cfg.patch_size) if keep else None,
    )
    return step, ids, boxes
