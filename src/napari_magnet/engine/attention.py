"""The attention-sampling model through the same ``magnify`` stream (DESIGN §5, §6).

The attention network looks at the region's square frame rendered at ``view_size`` (the same
black-padded framing MagNet's layer 1 sees); ``N`` positions are sampled from it, and each
becomes a patch of ``patch_size`` pixels covering ``patch_size × patch_level_scale`` level-0
pixels, read from the pyramid level it needs by the shared :class:`RegionReader`.
"""

from __future__ import annotations

import numpy as np
import torch

from .regions import RegionReader
from .types import MagnifyResult, MagnifyStep


def patch_frames(frame: np.ndarray, centres: np.ndarray, side: float) -> np.ndarray:
    """Square level-0 frames of ``side`` around view-normalised ``centres`` ``(n, 2)``."""
    size = frame[2] - frame[0]
    cx = frame[0] + centres[:, 0] * size
    cy = frame[1] + centres[:, 1] * size
    half = side / 2.0
    return np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)


def restrict_to_visible(attention: torch.Tensor, frame: np.ndarray,
                        box: np.ndarray) -> torch.Tensor:
    """Zero the attention on the frame's black padding (outside ``box``) and renormalise.

    Patches drawn there would show nothing; the attention network may still put mass there
    before it is trained.
    """
    h, w = attention.shape[-2:]
    size = frame[2] - frame[0]
    xs = frame[0] + (np.arange(w) + 0.5) / w * size
    ys = frame[1] + (np.arange(h) + 0.5) / h * size
    inside = ((ys >= box[1]) & (ys < box[3]))[:, None] & ((xs >= box[0]) & (xs < box[2]))[None]
    if not inside.any():
        return attention
    mask = torch.from_numpy(inside).to(attention.device, attention.dtype)
    masked = attention * mask
    return masked / masked.sum(dim=(-2, -1), keepdim=True)


def magnify_attention_sampling(model, reader: RegionReader, frames: np.ndarray,
                               visible: np.ndarray, dev: torch.device, keep_patches: bool,
                               seed: int, n_patches: int | None = None):
    """Generator body of :func:`~napari_magnet.engine.magnify.magnify` for ``ats`` models."""
    cfg = model.config
    if getattr(cfg, "two_level", False):
        raise ValueError("two-level attention sampling is not implemented yet; use a "
                         "one-level 'ats' config")
    n = cfg.n_patches if n_patches is None else int(n_patches)
    if n < 1:
        raise ValueError(f"number of patches must be at least 1, got {n}")
    frame, box = frames[0], visible[0]
    view_batch = reader.read(frames, cfg.view_size, visible)
    view = view_batch.to_tensor(dev)
    attention = restrict_to_visible(model.attention(view), frame, box)
    positions = int((attention > 0).sum())
    if not cfg.replace and n > positions:
        raise ValueError(f"cannot draw {n} distinct patches from {positions} positions")
    generator = torch.Generator(device=dev).manual_seed(seed)
    indices, sampled = model.sample(attention, n, cfg.replace, generator)
    centres = model.positions_to_centres(indices, attention.shape[-2:], view.shape[-2:])
    centres_np = centres[0].float().cpu().numpy()
    side = cfg.patch_size * cfg.patch_level_scale
    patch_boxes = patch_frames(frame, centres_np, side)
    batch = reader.read(patch_boxes, cfg.patch_size, np.repeat(visible, n, axis=0))
    patches = batch.to_tensor(dev)
    logits, _ = model.classify(patches, attention, indices, replace=cfg.replace)
    lo = np.maximum(patch_boxes[:, :2], box[:2])
    hi = np.maximum(np.minimum(patch_boxes[:, 2:], box[2:]), lo)
    yield MagnifyStep(
        layer=1,
        region_ids=[str(i + 1) for i in range(n)],
        parent_ids=[""] * n,
        boxes=np.concatenate([lo, hi], axis=1),
        levels=batch.levels,
        attention_maps=[attention[0].float().cpu().numpy()],
        attention_boxes=frames.copy(),
        attention_mass=sampled[0].float().cpu().numpy().astype(float),
        scales=np.full(n, side / (frame[2] - frame[0])),
        aux_probability=None,
        patches=batch.images if keep_patches else None,
    )
    probability = float(torch.softmax(logits.float(), dim=1)[0, -1])
    view_h, view_w = view.shape[-2:]
    return MagnifyResult(
        probability=probability,
        label=int(probability >= 0.5),
        pixels_processed=int((view_h * view_w + n * cfg.patch_size ** 2) * 3),
        pixels_read=0,
        seconds=0.0,
        model_name=getattr(model, "model_name", cfg.name),
        checkpoint_sha256=getattr(model, "checkpoint_sha256", ""),
        config_hash=cfg.config_hash(),
    )
