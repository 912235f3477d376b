"""``magnify``: run a model on a slide and stream what it looks at (DESIGN §6).

The generator yields one :class:`MagnifyStep` per magnifying layer as soon as that layer is
computed, then one :class:`MagnifyResult`. Stopping the iteration (``close()``) cancels the
run at the next step boundary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np
import torch

from ..models.registry import resolve_device
from ..slide import Slide
from .cuda_graphs import graph_cache_for
from .regions import RegionReader, child_frames, slide_frame
from .types import MagnifyResult, MagnifyStep

Box = Sequence[float]


def start_region(slide: Slide, box: Box | None) -> tuple[np.ndarray, np.ndarray]:
    """Frame and visible box of layer 1: the whole slide, or a user's box inside it.

    Raises
    ------
    ValueError
        The box is not finite, has no area, or lies outside the slide.
    """
    if box is None:
        return slide_frame(slide)
    x0, y0, x1, y1 = (float(v) for v in box)
    width, height = slide.dimensions
    if not np.all(np.isfinite([x0, y0, x1, y1])):
        raise ValueError(f"box {tuple(box)} is not finite")
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    x0, x1 = max(x0, 0.0), min(x1, float(width))
    y0, y1 = max(y0, 0.0), min(y1, float(height))
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError(f"box {tuple(box)} has no area inside the slide ({width} x {height})")
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    frame = np.array([[cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]])
    return frame, np.array([[x0, y0, x1, y1]])


def mass_inside(maps: np.ndarray, frames: np.ndarray, boxes: np.ndarray,
                per_input: int) -> np.ndarray:
    """Attention mass of each input's map that falls inside each of its child boxes."""
    n, h, w = maps.shape
    masses = np.zeros(len(boxes))
    for r, box in enumerate(boxes):
        frame = frames[r // per_input]
        fx = (np.arange(w) + 0.5) / w * (frame[2] - frame[0]) + frame[0]
        fy = (np.arange(h) + 0.5) / h * (frame[3] - frame[1]) + frame[1]
        inside_x = (fx >= box[0]) & (fx < box[2])
        inside_y = (fy >= box[1]) & (fy < box[3])
        masses[r] = maps[r // per_input][np.ix_(inside_y, inside_x)].sum()
    return masses


def magnify(slide: Slide, model: torch.nn.Module, device: str | torch.device = "auto", *,
            box: Box | None = None, rule: str = "enough", keep_patches: bool = False,
            seed: int = 0, n_patches: int | None = None, aux_heads: bool = True
            ) -> Iterator[MagnifyStep | MagnifyResult]:
    """Run ``model`` on ``slide``, one magnifying layer at a time.

    Parameters
    ----------
    slide : Slide
        An open slide.
    model : torch.nn.Module
        From :func:`napari_magnet.load_model` (a MagNet or an attention-sampling model).
    device : str or torch.device
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``.
    box : sequence of 4 floats, optional
        Level-0 ``(x0, y0, x1, y1)``: layer 1 looks at this box instead of the whole slide.
    rule : {"enough", "paper"}
        Pyramid level rule for region reads.
    keep_patches : bool
        Attach the images each layer's regions were rendered as to the steps.
    seed : int
        Seed for models that sample (attention sampling); a fixed seed makes runs repeatable.
    n_patches : int, optional
        Override of the number of patches an attention-sampling model draws. MagNet's
        patches per layer are part of its architecture and cannot be overridden.
    aux_heads : bool
        Compute MagNet's auxiliary slide-level predictions per layer (two ResNet-18s, ~40% of
        a CPU run); turn off for cohort runs that need only the slide prediction.

    Yields
    ------
    MagnifyStep, then MagnifyResult
    """
    dev = resolve_device(device)
    model = model.to(dev).eval()
    architecture = getattr(model, "architecture", None)
    if architecture == "magnet":
        if n_patches is not None:
            raise ValueError("MagNet's patches per layer are fixed by its architecture; "
                             "choose magnet3 or magnet4 instead of overriding them")
        runner = partial(_magnify_magnet, aux_heads=aux_heads)
    elif architecture == "ats":
        from .attention import magnify_attention_sampling

        runner = partial(magnify_attention_sampling, n_patches=n_patches)
    else:
        raise TypeError(f"cannot magnify with {type(model).__name__}: not a model from "
                        f"load_model (architecture {architecture!r})")
    frame, visible = start_region(slide, box)
    start = time.perf_counter()
    with RegionReader(slide, rule=rule, device=dev) as reader, torch.inference_mode():
        result = yield from runner(model, reader, frame, visible, dev, keep_patches, seed)
        result.seconds = time.perf_counter() - start
        result.pixels_read = reader.pixels_read
    yield result


def _to_uint8_images(patches: torch.Tensor) -> np.ndarray:
    return (patches.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _magnify_magnet(model, reader: RegionReader, frames: np.ndarray, visible: np.ndarray,
                    dev: torch.device, keep_patches: bool, seed: int, aux_heads: bool = True):
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
        child_ids = [f"{pid}.{p + 1}" if pid else str(p + 1)
                     for pid in ids for p in range(per_input)]
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
            (aux_logit,) = stage(("aux", layer),
                                 lambda p, layer=layer: (model.aux_logit(layer, p, 1),), patches)
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
