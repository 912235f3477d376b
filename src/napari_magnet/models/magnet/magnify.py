"""MagNet through the ``magnify`` stream (DESIGN §4, §6): one step per magnifying layer."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import torch

from ...engine.cuda_graphs import graph_cache_for
from ...engine.frames import child_frames, mass_inside
from ...engine.types import MagnifyOptions, MagnifyResult, MagnifyStep

__all__ = ["magnify_magnet"]


def _to_uint8_images(patches: torch.Tensor) -> np.ndarray:
    return (patches.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def magnify_magnet(
    model,
    reader: Any,
    frames: np.ndarray,
    visible: np.ndarray,
    dev: torch.device,
    options: MagnifyOptions,
) -> Generator[MagnifyStep, None, MagnifyResult]:
    """The MagNet family's run through :func:`~napari_magnet.engine.magnify.magnify`.

    One step per magnifying layer: its regions (lineage ids ``1`` … ``1.3.2``), the pyramid
    level each was read from, the mean learned attention map of each input and its mass
    inside each child; then the classifier's :class:`MagnifyResult`.
    """
    keep_patches, aux_heads = options.keep_patches, options.aux_heads
    cfg = model.config
    lo = reader.read(frames, cfg.input_size, visible).to_tensor(dev)
    hi_batch = reader.read(frames, model.hi_size(1), visible)
    hi = hi_batch.to_tensor(dev)
    hi_levels = hi_batch.levels
    ids = [""]
    aux_layers = set(getattr(cfg, "aux_layers", ())) if aux_heads else set()
    graphs = graph_cache_for(model, dev)

    def stage(key, fn, *inputs):
        return fn(*inputs) if graphs is None else graphs.run(key, fn, *inputs)

    def layer_fn(layer):
        def run(lo, hi):
            out = model.magnify_layer(layer, lo, hi)
            return out.theta, out.maps, out.patches

        return run

    patches = None
    for layer in range(1, model.num_layers + 1):
        theta_t, maps_t, patches = stage(("layer", layer), layer_fn(layer), lo, hi)
        theta = theta_t.float().cpu().numpy()
        n_inputs, per_input = theta.shape[:2]
        child, child_visible = child_frames(frames, visible, theta)
        child_ids = [
            f"{pid}.{p + 1}" if pid else str(p + 1) for pid in ids for p in range(per_input)
        ]
        parent_ids = [pid for pid in ids for _ in range(per_input)]
        if layer < model.num_layers:
            hi_batch = reader.read(child, model.hi_size(layer + 1), child_visible)
            levels = hi_batch.levels
        else:
            # The last layer's patches are sampled from their parents' I'.
            levels = np.repeat(hi_levels, per_input)
        maps = maps_t.float().cpu().numpy()
        learned = list(cfg.learned_patches(layer)) or list(range(per_input))
        input_maps = maps[:, learned].mean(axis=1)
        aux = None
        if layer in aux_layers:
            (aux_logit,) = stage(
                ("aux", layer), lambda p, layer=layer: (model.aux_logit(layer, p, 1),), patches
            )
            aux = float(torch.sigmoid(aux_logit.float())[0])
        yield MagnifyStep(
            layer=layer,
            region_ids=child_ids,
            parent_ids=parent_ids,
            boxes=child_visible,
            levels=levels,
            attention_maps=list(input_maps),
            attention_boxes=frames.copy(),
            attention_mass=mass_inside(input_maps, frames, child_visible, per_input),
            scales=theta[:, :, 0, 0].reshape(-1).astype(float),
            aux_probability=aux,
            patches=_to_uint8_images(patches) if keep_patches else None,
        )
        if layer < model.num_layers:
            lo, hi = patches, hi_batch.to_tensor(dev)
            hi_levels = levels
            frames, visible, ids = child, child_visible, child_ids
    (logit,) = stage("classify", lambda p: (model.classify(p, 1),), patches)
    probability = float(torch.sigmoid(logit.float())[0])
    return MagnifyResult(
        probability=probability,
        label=int(probability >= 0.5),
        pixels_processed=int(model.pixels_processed()),
        pixels_read=0,
        seconds=0.0,
        model_name=getattr(model, "model_name", cfg.name),
        checkpoint_sha256=getattr(model, "checkpoint_sha256", ""),
        config_hash=cfg.config_hash(),
    )
