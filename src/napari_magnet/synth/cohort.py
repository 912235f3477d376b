"""Cohorts of synthetic slides: balanced labels, Camelyon size classes, ``cohort.csv``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from ..engine.cohort import write_cohort
from .spec import TUMOUR_KINDS, SyntheticSlideInfo, SyntheticSlideSpec, feasible_kinds
from .writing import generate_slide

__all__ = ["generate_cohort"]


def generate_cohort(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int,
    width: int,
    height: int,
    mpp: float = 0.5,
    *,
    tile: int = 512,
    quality: int = 80,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    positives: Sequence[str] | None = None,
    jobs: int = 1,
) -> list[SyntheticSlideInfo]:
    """Generate ``n`` slides with balanced labels and write ``out_dir/cohort.csv``.

    Labels alternate 0/1 in an order shuffled by ``seed`` (``n // 2`` positives, one more
    negative when ``n`` is odd); positives cycle through the tumour classes that fit the
    slide size (macro, micro, itc), or through ``positives``, in a seed-shuffled order.
    Slide ``i`` is ``out_dir/slide_{i:04d}.tif`` with a seed derived from ``(seed, i)``, so
    a slide does not depend on ``jobs``.

    Parameters
    ----------
    out_dir : path-like
        Output folder (created if needed).
    n : int
        Number of slides (>= 1).
    seed : int
        Cohort seed (>= 0).
    width, height : int
        Level-0 size of every slide.
    mpp : float
        Microns per pixel of every slide.
    tile, quality : int
        TIFF tile side and JPEG quality.
    progress : callable, optional
        ``progress(done, total)`` in slides.
    workers : int, optional
        Threads per slide (see :func:`generate_slide`).
    positives : sequence of str, optional
        The tumour classes positives cycle through; repeat a class to weight it
        (``("micro", "micro", "macro")``: two micro slides for each macro one).
    jobs : int
        Slides generated at once, in separate processes.

    Returns
    -------
    list of SyntheticSlideInfo

    Notes
    -----
    ``cohort.csv`` (written by :func:`napari_magnet.engine.cohort.write_cohort`) has the
    columns ``path`` (relative to ``out_dir``), ``label``, ``lesion_class``
    (``negative``/``itc``/``micro``/``macro``) and ``lesion_boxes``: a JSON list of the
    tumour lesions' level-0 boxes ``[x0, y0, x1, y1]`` (distractors are not listed; they are
    in each slide's sidecar).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    # validates width, height, mpp, tile and quality once, before anything is written
    SyntheticSlideSpec(width, height, mpp, 0, 0, None, tile, quality)
    if isinstance(jobs, bool) or not isinstance(jobs, (int, np.integer)) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    feasible = list(feasible_kinds(width, height, mpp))
    if positives is not None:
        positives = [str(k) for k in positives]
        unknown = sorted(set(positives) - set(TUMOUR_KINDS))
        if unknown or not positives:
            raise ValueError(
                f"positives must name tumour classes {sorted(TUMOUR_KINDS)}, got {positives}"
            )
        too_big = sorted(set(positives) - set(feasible))
        if too_big:
            raise ValueError(
                f"a {width}x{height} px slide at {mpp} µm/px is too small for "
                f"{too_big} lesions; fitting classes: {feasible}"
            )
    labels = np.array([i % 2 for i in range(n)])
    rng.shuffle(labels)
    if feasible:
        order = list(rng.permutation(positives if positives is not None else feasible))
    else:
        labels[:] = 0
        order = []
    specs = []
    n_pos = 0
    for i in range(n):
        label = int(labels[i])
        kind = "negative"
        if label == 1:
            kind = str(order[n_pos % len(order)])
            n_pos += 1
        state = np.random.SeedSequence([int(seed), i]).generate_state(1, np.uint64)
        slide_seed = int(state[0] >> np.uint64(1))  # < 2**63
        specs.append(SyntheticSlideSpec(width, height, mpp, slide_seed, label, kind, tile, quality))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"slide_{i:04d}.tif" for i in range(n)]
    infos: list[SyntheticSlideInfo] = [None] * n  # type: ignore[list-item]
    if jobs == 1:
        for i, spec in enumerate(specs):
            infos[i] = generate_slide(paths[i], spec, workers=workers)
            if progress is not None:
                progress(i + 1, n)
    else:
        with ProcessPoolExecutor(min(int(jobs), n)) as pool:
            futures = {
                pool.submit(generate_slide, paths[i], spec, workers=workers or 1): i
                for i, spec in enumerate(specs)
            }
            for done, future in enumerate(as_completed(futures), 1):
                infos[futures[future]] = future.result()
                if progress is not None:
                    progress(done, n)
    write_cohort(
        out / "cohort.csv",
        [
            {
                "path": info.path.name,
                "label": info.label,
                "lesion_class": info.lesion_kind,
                "lesion_boxes": [les.box for les in info.tumour_lesions],
            }
            for info in infos
        ],
    )
    return infos
