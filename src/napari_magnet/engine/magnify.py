"""``magnify``: run a model on a slide and stream what it looks at (DESIGN §6).

The generator yields one :class:`MagnifyStep` per magnifying layer as soon as that layer is
computed, then one :class:`MagnifyResult`. Stopping the iteration (``close()``) cancels the
run at the next step boundary.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from ..models.registry import resolve_device
from ..slide import Slide
from .frames import start_region
from .regions import RegionReader
from .types import MagnifyOptions, MagnifyResult, MagnifyStep

Box = Sequence[float]


def magnify(
    slide: Slide,
    model: torch.nn.Module,
    device: str | torch.device = "auto",
    *,
    box: Box | None = None,
    rule: str = "enough",
    keep_patches: bool = False,
    seed: int = 0,
    n_patches: int | None = None,
    aux_heads: bool = True,
) -> Iterator[MagnifyStep | MagnifyResult]:
    """Run ``model`` on ``slide``, one magnifying layer at a time.

    Parameters
    ----------
    slide : Slide
        An open slide.
    model : torch.nn.Module
        From :func:`napari_magnet.load_model`: a model of any registered family
        (:mod:`napari_magnet.models.family`).
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
        Override of the number of patches drawn, for families whose patches are adjustable
        (``Family.adjustable_patches``); for the others it is an error.
    aux_heads : bool
        Compute per-layer auxiliary predictions where a family has them (MagNet's two
        ResNet-18s, ~40% of a CPU run); turn off for cohort runs that need only the slide
        prediction.

    Yields
    ------
    MagnifyStep, then MagnifyResult
    """
    from ..models.family import family_of

    dev = resolve_device(device)
    family = family_of(model)
    if n_patches is not None and not family.adjustable_patches:
        raise ValueError(
            f"{getattr(model, 'model_name', family.architecture)}: the patches per "
            f"layer of a {family.architecture!r} model are fixed by its architecture; "
            f"choose another configuration instead of overriding them"
        )
    options = MagnifyOptions(
        keep_patches=keep_patches, seed=seed, n_patches=n_patches, aux_heads=aux_heads
    )
    model = model.to(dev).eval()
    frame, visible = start_region(slide, box)
    start = time.perf_counter()
    with RegionReader(slide, rule=rule, device=dev) as reader, torch.inference_mode():
        result = yield from family.magnify(model, reader, frame, visible, dev, options)
        result.seconds = time.perf_counter() - start
        result.pixels_read = reader.pixels_read
    yield result
