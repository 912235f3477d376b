"""Attention sampling through the ``magnify`` stream (DESIGN §5, §6).

The attention network looks at the region's square frame rendered at ``view_size`` (the same
black-padded framing MagNet's layer 1 sees); ``N`` positions are sampled from it, and each
becomes a patch of ``patch_size`` pixels covering ``patch_size × patch_level_scale`` level-0
pixels, read from the pyramid level it needs by the shared :class:`RegionReader`. A two-level
model first draws regions that way, looks at each with a second attention network and draws
the patches inside it.
"""

from __future__ import annotations

import numpy as np
import torch

from collections.abc import Generator
from typing import Any

from ...engine.frames import clip_boxes, patch_frames, visible_mask
from ...engine.types import MagnifyOptions, MagnifyResult, MagnifyStep

__all__ = ["magnify_attention_sampling", "restrict_to_visible"]


def restrict_to_visible(attention: torch.Tensor, frame: np.ndarray,
                        box: np.ndarray) -> torch.Tensor:
    """Zero the attention on the frame's black padding (outside ``box``) and renormalise.

    Patches drawn there would show nothing; the attention network may still put mass there
    before it is trained.
    """
    inside = visible_mask(frame, box, tuple(attention.shape[-2:]))
    if not inside.any():
        return attention
    mask = torch.from_numpy(inside).to(attention.device, attention.dtype)
    masked = attention * mask
    return masked / masked.sum(dim=(-2, -1), keepdim=True)


def _check_draws(attention: torch.Tensor, n: int, replace: bool, what: str) -> None:
    positions = int((attention > 0).flatten(1).sum(dim=1).min())
    if not replace and n > positions:
        raise ValueError(f"cannot draw {n} distinct {what} from {positions} positions")


def magnify_attention_sampling(model, reader: Any, frames: np.ndarray, visible: np.ndarray,
                               dev: torch.device, options: MagnifyOptions
                               ) -> Generator[MagnifyStep, None, MagnifyResult]:
    """The attention-sampling family's run through :func:`~napari_magnet.engine.magnify.magnify`.

    One level yields one step (the patches, ids ``1``…``N``). Two-level yields the regions
    drawn from the view's attention (layer 1, ids ``1``…``N1``), then the patches drawn from
    each region's own attention (layer 2, ids ``i.j``, one attention map per region).
    ``n_patches`` overrides the patches drawn (per region when two-level).
    """
    keep_patches, seed, n_patches = options.keep_patches, options.seed, options.n_patches
    cfg = model.config
    n = cfg.n_patches if n_patches is None else int(n_patches)
    if n < 1:
        raise ValueError(f"number of patches must be at least 1, got {n}")
    frame, box = frames[0], visible[0]
    view_batch = reader.read(frames, cfg.view_size, visible)
    view = view_batch.to_tensor(dev)
    attention = restrict_to_visible(model.attention(view), frame, box)
    first = cfg.n_regions if cfg.two_level else n
    _check_draws(attention, first, cfg.replace, "regions" if cfg.two_level else "patches")
    generator = torch.Generator(device=dev).manual_seed(seed)
    indices, sampled = model.sample(attention, first, cfg.replace, generator)
    centres = model.positions_to_centres(indices, attention.shape[-2:], view.shape[-2:])
    centres_np = centres[0].float().cpu().numpy()
    view_h, view_w = view.shape[-2:]
    # Layer 1: what the view's attention drew — the patches, or (two-level) the regions.
    side, size = (cfg.region_side, cfg.region_size) if cfg.two_level else (cfg.patch_side,
                                                                           cfg.patch_size)
    first_frames = patch_frames(frame, centres_np, side)
    first_batch = reader.read(first_frames, size, np.repeat(visible, first, axis=0))
    yield MagnifyStep(
        layer=1,
        region_ids=[str(i + 1) for i in range(first)],
        parent_ids=[""] * first,
        boxes=clip_boxes(first_frames, box),
        levels=first_batch.levels,
        attention_maps=[attention[0].float().cpu().numpy()],
        attention_boxes=frames.copy(),
        attention_mass=sampled[0].float().cpu().numpy().astype(float),
        scales=np.full(first, side / (frame[2] - frame[0])),
        aux_probability=None,
        patches=first_batch.images if keep_patches else None,
    )
    pixels = view_h * view_w + first * size ** 2
    if not cfg.two_level:
        logits, _ = model.classify(first_batch.to_tensor(dev), attention, indices,
                                   replace=cfg.replace)
    else:
        n1, region_frames = first, first_frames
        region_att = model.region_attention(first_batch.to_tensor(dev))
        region_att = torch.cat([restrict_to_visible(region_att[i:i + 1], region_frames[i], box)
                                for i in range(n1)])
        _check_draws(region_att, n, cfg.replace, "patches per region")
        region_idx, region_sampled = model.sample(region_att, n, cfg.replace, generator)
        sub = model.positions_to_centres(region_idx, region_att.shape[-2:]).float().cpu().numpy()
        patch_boxes = np.concatenate([patch_frames(region_frames[i], sub[i], cfg.patch_side)
                                      for i in range(n1)])
        batch = reader.read(patch_boxes, cfg.patch_size, np.repeat(visible, n1 * n, axis=0))
        logits, _ = model.classify_two_level(batch.to_tensor(dev), attention, indices, region_att,
                                             region_idx, replace=cfg.replace)
        yield MagnifyStep(
            layer=2,
            region_ids=[f"{i + 1}.{j + 1}" for i in range(n1) for j in range(n)],
            parent_ids=[str(i + 1) for i in range(n1) for _ in range(n)],
            boxes=clip_boxes(patch_boxes, box),
            levels=batch.levels,
            attention_maps=[m.float().cpu().numpy() for m in region_att],
            attention_boxes=region_frames.copy(),
            attention_mass=region_sampled.reshape(-1).float().cpu().numpy().astype(float),
            scales=np.full(n1 * n, cfg.patch_side / cfg.region_side),
            aux_probability=None,
            patches=batch.images if keep_patches else None,
        )
        pixels += n1 * n * cfg.patch_size ** 2
    probability = float(torch.softmax(logits.float(), dim=1)[0, -1])
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
