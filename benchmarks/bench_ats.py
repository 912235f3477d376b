"""Attention sampling vs MagNet on the same gigapixel slide, in one run.

Magnify time (wall and CPU seconds), pixels the networks see and pixels read from the
pyramid, for ``ats``, ``ats-2level``, ``magnet3`` and ``magnet3-lite`` (random weights), interleaved after one
warm-up each, medians of ``REPEATS``.
"""

from __future__ import annotations

import os
import statistics
import time

from .bench_magnify import run_isolated
from .common import Section, big_slide_path

MODELS = ("ats", "ats-2level", "magnet3", "magnet3-lite")
REPEATS = 3


def _run(slide, model) -> tuple[float, float, object]:
    from napari_magnet import magnify

    start, cpu = time.perf_counter(), time.process_time()
    result = None
    for item in magnify(slide, model, device="cpu"):
        result = item
    return time.perf_counter() - start, time.process_time() - cpu, result


def run() -> list[Section]:
    big_slide_path()  # generate it here, with progress, if needed
    return run_isolated(__name__)


def sections() -> list[Section]:
    import torch

    from napari_magnet import load_model, open_slide

    torch.set_num_threads(os.cpu_count() or 1)
    path = big_slide_path()
    models = {name: load_model(name, device="cpu") for name in MODELS}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    walls = {name: [] for name in MODELS}
    cpus = {name: [] for name in MODELS}
    results = {}
    cold = {}
    # Cold: each model's first run on a freshly opened slide (chunk cache empty).
    for name in MODELS:
        with open_slide(path) as fresh:
            wall, _, result = _run(fresh, models[name])
            cold[name] = (wall, fresh.cache.misses)
    slide = open_slide(path)
    for name in MODELS:  # warm-up on the shared slide
        _run(slide, models[name])
    for rep in range(REPEATS):
        order = list(MODELS[rep % len(MODELS) :] + MODELS[: rep % len(MODELS)])
        for name in order:
            wall, cpu, result = _run(slide, models[name])
            walls[name].append(wall)
            cpus[name].append(cpu)
            results[name] = result
    slide.close()
    wall = {n: statistics.median(v) for n, v in walls.items()}
    cpu = {n: statistics.median(v) for n, v in cpus.items()}
    ref = "magnet3"
    rows = []
    for name in MODELS:
        r = results[name]
        rows.append(
            [
                f"`{name}`",
                f"{params[name]:,}",
                f"{wall[name]:.2f}",
                f"{cpu[name]:.2f}",
                f"{wall[name] / wall[ref]:.2f}×",
                f"{cold[name][0]:.2f} ({cold[name][1]} chunks)",
                f"{r.pixels_processed:,}",
                f"{r.pixels_processed / results[ref].pixels_processed:.2f}×",
                f"{r.pixels_read:,}",
            ]
        )
    ats_cfg = models["ats"].config
    two = models["ats-2level"].config
    notes = [
        f"Same slide, same process, one warm-up each; medians of {REPEATS} interleaved warm "
        f"runs (chunk cache warm); 'cold' is each model's first run on a freshly opened "
        f"slide (chunks decoded in that run). torch threads = {torch.get_num_threads()}, "
        f"random weights; a child process with `OMP_WAIT_POLICY=PASSIVE` (see P3).",
        f"`ats`: attention on a {ats_cfg.view_size}-px view of the whole slide, "
        f"{ats_cfg.n_patches} patches of {ats_cfg.patch_size}² at {ats_cfg.patch_level_scale:g} "
        f"level-0 px per patch px; pixels processed = (view + N·P²)·3. MagNet counts "
        f"(10·56² + 18·224²)·3 for 3 layers.",
        f"`ats-2level`: {two.n_regions} regions of {two.region_size}² at "
        f"{two.region_level_scale:g} level-0 px per region px drawn from the view's attention, "
        f"then attention again inside each region and {two.n_patches} patches per region "
        f"({two.total_patches} in all, same patch size and scale as `ats`); pixels processed = "
        f"(view + N1·R² + N1·N2·P²)·3; two steps stream.",
        f"`ats` takes {wall['ats'] / wall[ref]:.3f}× the time of `magnet3` and sees "
        f"{results['ats'].pixels_processed / results[ref].pixels_processed:.3f}× its pixels; "
        f"`ats-2level` {wall['ats-2level'] / wall[ref]:.3f}× and "
        f"{results['ats-2level'].pixels_processed / results[ref].pixels_processed:.3f}×; "
        f"`magnet3-lite` (small backbones) takes {wall['magnet3-lite'] / wall[ref]:.2f}× "
        f"`magnet3`'s time for the same pixels processed.",
    ]
    return [
        Section(
            title="ATS vs MagNet — Magnify time and pixels on the generated slide",
            goal="report Magnify time and pixels processed of `ats` (one and two levels) against "
            "`magnet3` and `magnet3-lite`, in one run",
            header=[
                "model",
                "params",
                "wall s (median)",
                "CPU s (median)",
                "× magnet3 time",
                "cold wall s",
                "pixels processed",
                "× magnet3 pixels",
                "pixels read",
            ],
            rows=rows,
            notes=notes,
        )
    ]
