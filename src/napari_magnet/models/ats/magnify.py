"""Attention sampling through the ``magnify`` stream (DESIGN §5, §6).

The attention network looks at the region's square frame rendered at ``view_size`` (the same
black-padded framing MagNet's layer 1 sees); ``N`` positions are sampled from it, and each
becomes a patch of ``patch_size`` pixels covering ``patch_size × patch_level_scale`` level-0
pixels, read from the pyramid level it needs by the shared :class:`RegionReader`. A two-level
model first draws regions that way, looks at each with a second attention network and draws
the patches inside it.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import torch

from ...engine.frames import clip_boxes
from ...engine.types import MagnifyOptions, MagnifyResult, MagnifyStep
from .reads import SlideReads

__all__ = ["magnify_attention_sampling"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().cpu().numpy()


def magnify_attention_sampling(
    model,
    reader: Any,
    frames: np.ndarray,
    visible: np.ndarray,
    dev: torch.device,
    options: MagnifyOptions,
) -> Generator[MagnifyStep, None, MagnifyResult]:
    """The attention-sampling family's run through :func:`~napari_magnet.engine.magnify.magnify`.

    One forward of the model (:meth:`AttentionSampling.forward`, reading through
    :class:`~.reads.SlideReads` over the one slide, attention masked outside it, draws from a
    generator seeded with ``options.seed``), then its draws as steps. One level yields one step
    (the patches, ids ``1``…``N``). Two-level yields the regions drawn from the view's attention
    (layer 1, ids ``1``…``N1``), then the patches drawn from each region's own attention
    (layer 2, ids ``i.j``, one attention map per region).

    Parameters
    ----------
    model : AttentionSampling
        In eval mode, on ``dev``.
    reader : RegionReader
        The slide's reader.
    frames, visible : np.ndarray
        ``(1, 4)`` level-0 square frame the view shows and the visible box inside it.
    dev : torch.device
        Where the model runs.
    options : MagnifyOptions
        ``keep_patches``, ``seed`` and ``n_patches`` (overrides the patches drawn, per region
        when two-level) are used.

    Yields
    ------
    MagnifyStep
        Layer 1, then (two-level) layer 2.

    Returns
    -------
    MagnifyResult
        The probability of the last class and what was processed.
    """
    cfg = model.config
    n = cfg.n_patches if options.n_patches is None else int(options.n_patches)
    if n < 1:
        raise ValueError(f"number of patches must be at least 1, got {n}")
    frame, box = frames[0], visible[0]
    view = reader.read(frames, cfg.view_size, visible).to_tensor(dev)
    reads = SlideReads(cfg, [reader], frames, visible, dev, keep=True)
    generator = torch.Generator(device=dev).manual_seed(options.seed)
    out = model(
        view,
        reads.read_patches,
        generator,
        n=n,
        replace=cfg.replace,
        read_regions=reads.read_regions if cfg.two_level else None,
        visible=reads.visible_mask,
        strict=True,
    )
    keep = options.keep_patches
    # Layer 1: what the view's attention drew — the patches, or (two-level) the regions.
    first = out.indices.shape[1]
    if cfg.two_level:
        side, size, first_frames = cfg.region_side, cfg.region_size, reads.region_frames[0]
        first_batch = reads.batches["regions"][0]
    else:
        side, size, first_frames = cfg.patch_side, cfg.patch_size, reads.patch_frames[0]
        first_batch = reads.batches["patches"][0]
    yield MagnifyStep(
        layer=1,
        region_ids=[str(i + 1) for i in range(first)],
        parent_ids=[""] * first,
        boxes=clip_boxes(first_frames, box),
        levels=first_batch.levels,
        attention_maps=[_numpy(out.attention[0])],
        attention_boxes=frames.copy(),
        attention_mass=_numpy(out.sampled_attention[0]).astype(float),
        scales=np.full(first, side / (frame[2] - frame[0])),
        aux_probability=None,
        patches=first_batch.images if keep else None,
    )
    view_h, view_w = view.shape[-2:]
    pixels = view_h * view_w + first * size**2
    if cfg.two_level:
        n1, region_frames, batch = first, first_frames, reads.batches["patches"][0]
        yield MagnifyStep(
            layer=2,
            region_ids=[f"{i + 1}.{j + 1}" for i in range(n1) for j in range(n)],
            parent_ids=[str(i + 1) for i in range(n1) for _ in range(n)],
            boxes=clip_boxes(reads.patch_frames[0], box),
            levels=batch.levels,
            attention_maps=[_numpy(m) for m in out.region_attention],
            attention_boxes=region_frames.copy(),
            attention_mass=_numpy(out.region_sampled_attention.reshape(-1)).astype(float),
            scales=np.full(n1 * n, cfg.patch_side / cfg.region_side),
            aux_probability=None,
            patches=batch.images if keep else None,
        )
        pixels += n1 * n * cfg.patch_size**2
    probability = float(torch.softmax(out.logits.float(), dim=1)[0, -1])
    return MagnifyResult(
        probability=probability,
        label=int(probability >= 0.5),
        pixels_processed=int(pixels * 3),
        pixels_read=0,
        seconds=0.0,
        model_name=getattr(model, "model_name", cfg.name),
        checkpoint_sha256=getattr(model, "checkpoint_sha256", ""),
        config_hash=cfg.config_hash(),
    )
