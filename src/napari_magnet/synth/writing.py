"""Writing a synthetic slide: the pyramidal JPEG TIFF and its ground-truth sidecar.

Level 0 is the first IFD, each lower level a further main IFD with the "reduced resolution"
bit set; tiles are YCbCr 4:2:0 JPEG, and XResolution/YResolution in pixels per centimetre
give OpenSlide's ``openslide.mpp-x``/``mpp-y``. tifffile receives an iterator of
already-encoded tiles, so no level is ever held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile

from ..io.atomic import atomic_path
from .layout import build_plan
from .rendering import encode_tile, encoded_tiles, tile_grid
from .spec import SyntheticSlideInfo, SyntheticSlideSpec
from .truth import write_ground_truth

__all__ = ["generate_slide"]


def generate_slide(
    path: str | os.PathLike[str],
    spec: SyntheticSlideSpec,
    progress: Callable[[int, int], None] | None = None,
    *,
    workers: int | None = None,
) -> SyntheticSlideInfo:
    """Write a synthetic pyramidal JPEG TIFF and its ground-truth sidecar.

    Parameters
    ----------
    path : path-like
        Output slide path (``.tif`` recommended). The file is written to a temporary file
        beside it first and renamed when complete (:func:`napari_magnet.io.atomic.atomic_path`);
        the sidecar goes to ``<stem>.truth.json``.
    spec : SyntheticSlideSpec
        What to generate. The same spec always gives the same pixels (and the same bytes).
    progress : callable, optional
        Called as ``progress(done, total)`` with tile counts over all levels, from the
        calling thread: once with ``done=0``, then at most about 1000 times, the last with
        ``done == total``. An exception raised by it aborts the generation (use that to
        cancel); it propagates, and neither the slide nor its sidecar is left behind.
    workers : int, optional
        Threads rendering and encoding tiles; default: the number of CPUs (at most 8).
        The output does not depend on it.

    Returns
    -------
    SyntheticSlideInfo
        Geometry, label, class and lesions of the slide.

    Raises
    ------
    ValueError
        If ``spec`` is not a :class:`SyntheticSlideSpec` or ``workers`` < 1.
    """
    if not isinstance(spec, SyntheticSlideSpec):
        raise ValueError(f"spec must be a SyntheticSlideSpec, got {type(spec).__name__}")
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    path = Path(path)
    plan, label, kind = build_plan(spec)
    glass = encode_tile(
        np.broadcast_to(plan.glass_rgb, (spec.tile, spec.tile, 3)).copy(), spec.quality
    )
    total = sum(a * b for a, b in (tile_grid(plan, k) for k in range(len(plan.sizes))))
    every = max(1, total // 1000)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None and (done % every == 0 or done == total):
            progress(done, total)

    if progress is not None:
        progress(0, total)
    bigtiff = spec.width * spec.height > 2**30
    pool = ThreadPoolExecutor(workers, thread_name_prefix="synthetic") if workers > 1 else None
    try:
        with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tw:
            for k, (lw, lh) in enumerate(plan.sizes):
                res = 1e4 / (spec.mpp * plan.downs[k])
                tw.write(
                    encoded_tiles(plan, k, glass, pool, 4 * workers + 4, tick),
                    shape=(lh, lw, 3),
                    dtype=np.uint8,
                    tile=(spec.tile, spec.tile),
                    photometric="rgb",
                    compression="jpeg",
                    subsampling=(2, 2),
                    resolution=(res, res),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if k == 0 else 1,
                    description=(
                        f"napari-magnet synthetic slide; seed={spec.seed}; mpp={spec.mpp}"
                        if k == 0
                        else None
                    ),
                    software="napari-magnet",
                    metadata=None,
                )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    info = SyntheticSlideInfo(
        path=path,
        width=spec.width,
        height=spec.height,
        mpp=spec.mpp,
        seed=spec.seed,
        label=label,
        lesion_kind=kind,
        lesions=tuple(les.lesion for les in plan.lesions),
        levels=tuple(plan.sizes),
    )
    write_ground_truth(info, spec)
    return info
