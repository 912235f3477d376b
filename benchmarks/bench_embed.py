"""Patch embedding throughput, in one run on the same slide, bag and encoder (issue 13).

* ours: :func:`napari_magnet.bags.embedding.embed_bag` (pyramid reads on worker threads,
  ``roi_align`` resampling on the device, one batch read ahead of the encoder, features
  written into the bag file);
* CLAM-style: a torch ``Dataset`` doing one OpenSlide ``read_region`` per patch at the
  patch's level, PIL resize to the patch size, a ``DataLoader`` (no worker processes on a
  CPU, 8 with pinned memory on a GPU, as CLAM's ``extract_features_fp.py`` sets it), then the
  same encoder;
* the limit: the same encoder alone on random uint8 input of the same shape and batches.

On a GPU the encoder runs there (bf16 autocast for every path, as ours does) and ours runs
twice: JPEG tiles decoded on the CPU threads, and decoded on the GPU by nvJPEG.

Encoders ``resnet50-trunc`` with random weights (no download) and the shipped ``napari-small``,
each in its own side-by-side section; patches of 224 px at 1 and 0.5 µm per pixel of
``CMU-1-Small-Region.svs`` (every patch kept: ~160), batch size 16.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

from .common import Section

HERE = Path(__file__).resolve().parent
SLIDE = HERE.parent.parent / "shared" / "testdata" / "wsi" / "CMU-1-Small-Region.svs"
MPPS = "1,0.5"
PATCH = 224
BATCH = 16
ENCODERS = ("resnet50-trunc", "napari-small")
#: Interleaved rounds per encoder: a napari-small round lasts under a second, so more of them.
ROUNDS = {"resnet50-trunc": 2, "napari-small": 7}


class ClamStyleDataset:
    """One OpenSlide ``read_region`` per patch, resized with PIL (CLAM's per-patch loop)."""

    def __init__(self, slide_path: Path, level) -> None:
        self.slide_path = slide_path
        self.level = level
        self.wsi = None

    def __len__(self) -> int:
        return len(self.level)

    def __getitem__(self, i: int):
        import numpy as np
        import openslide
        import torch
        from PIL import Image

        if self.wsi is None:
            self.wsi = openslide.OpenSlide(str(self.slide_path))
        lv = int(self.level.patch_level)
        ds = self.wsi.level_downsamples[lv]
        x, y = (int(v) for v in self.level.coords[i])
        side = round(self.level.extent[0] / ds)
        image = self.wsi.read_region((x, y), lv, (side, side)).convert("RGB")
        if side != self.level.patch_size:
            image = image.resize((self.level.patch_size,) * 2, Image.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def _autocast(device):
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _clam_style(encoder, bag, device) -> int:
    import torch
    from torch.utils.data import DataLoader

    gpu = device.type == "cuda"
    n = 0
    for level in bag.levels:
        loader = DataLoader(
            ClamStyleDataset(SLIDE, level),
            batch_size=BATCH,
            num_workers=8 if gpu else 0,
            pin_memory=gpu,
        )
        with torch.inference_mode(), _autocast(device):
            for batch in loader:
                encoder.module(batch.to(device, non_blocking=True))
                n += len(batch)
    return n


def _limit(encoder, counts, device) -> int:
    import torch

    gen = torch.Generator().manual_seed(0)
    n = 0
    with torch.inference_mode(), _autocast(device):
        for count in counts:
            for start in range(0, count, BATCH):
                b = min(BATCH, count - start)
                x = torch.randint(0, 256, (b, 3, PATCH, PATCH), dtype=torch.uint8, generator=gen)
                encoder.module(x.to(device))
                n += b
    return n


def _timed(fn, device) -> tuple[float, float, object]:
    import torch

    start, cpu = time.perf_counter(), time.process_time()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu, value


def _section(encoder_name: str, bag_path: Path, bag, counts, tmp: str, device) -> Section:
    """The paths, side by side, for one encoder."""
    import torch

    from napari_magnet.bags.embedding import embed_bag
    from napari_magnet.bags.encoders import RandomFeaturesWarning, build_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomFeaturesWarning)
        encoder = build_encoder(encoder_name, device=device)
    _limit(encoder, [BATCH], device)  # warm-up
    out = Path(tmp) / f"out-{encoder_name}.h5"

    def ours(decode: str) -> int:
        result = embed_bag(
            bag_path, encoder, device, BATCH, output=out, slide=SLIDE, overwrite=True, decode=decode
        )
        if result.status != "written":
            raise RuntimeError(result.reason)
        return result.patches

    paths = {"encoder alone (random input, the limit)": lambda: _limit(encoder, counts, device)}
    if device.type == "cuda":
        paths["ours (embed_bag, JPEG tiles decoded on the GPU)"] = lambda: ours("device")
        paths["ours (embed_bag, JPEG tiles decoded on CPU threads)"] = lambda: ours("host")
    else:
        paths["ours (embed_bag: pyramid + roi_align, read-ahead)"] = lambda: ours("host")
    paths["CLAM-style (read_region per patch, DataLoader)"] = lambda: _clam_style(
        encoder, bag, device
    )
    runs: dict[str, list] = {name: [] for name in paths}
    for _ in range(ROUNDS[encoder_name]):  # interleaved: a burst of load elsewhere hits every path
        for name, fn in paths.items():
            runs[name].append(_timed(fn, device))
    timings = {name: min(found, key=lambda t: t[0]) for name, found in runs.items()}
    rate = {k: n / wall for k, (wall, _, n) in timings.items()}
    values = list(rate.values())
    limit, mine, clam = values[0], max(values[1:-1]), values[-1]
    rows = [
        [name, str(n), f"{wall:.1f}", f"{cpu:.1f}", f"{rate[name]:.2f}", f"{rate[name] / clam:.2f}"]
        for name, (wall, cpu, n) in timings.items()
    ]
    weights = "random weights" if encoder.weights is None else "its shipped weights"
    notes = [
        f"ours / CLAM-style: **{mine / clam:.2f}x** (goal ≥ 3x); ours / encoder alone: "
        f"**{mine / limit:.0%}** (goal ≥ 70 %).",
        f"The encoder alone runs at {limit / clam:.2f}x the CLAM-style loop on this machine: "
        "a reading path can approach that limit, never pass it"
        + (", so the 3x goal cannot be reached here." if limit / clam < 3 else "."),
        f"{sum(counts)} patches ({' + '.join(map(str, counts))} at {MPPS} µm/px), "
        f"{PATCH} px, batch {BATCH}, {encoder_name} with {weights}, "
        + (
            f"{torch.cuda.get_device_name(device)} (bf16 autocast)"
            if device.type == "cuda"
            else "CPU"
        )
        + f", {torch.get_num_threads()} torch threads, best wall time of {ROUNDS[encoder_name]} interleaved "
        "rounds after a warm-up batch; ours: the faster of its rows.",
        "Shared machine: other processes ran at the same time; compare the ratios.",
    ]
    header = ["path", "patches", "wall s", "CPU s", "patches/s", "× CLAM-style"]
    return Section(
        f"Patch embedding (napari-magnet embed), {encoder_name}",
        "≥ 3x a CLAM-style loop, ≥ 70 % of the encoder-alone limit",
        header,
        rows,
        notes,
    )


def run() -> list[Section] | None:
    import torch

    from napari_magnet.bags import PatchOptions, patch_slide, read_bag
    from napari_magnet.bags.tissue import TissueOptions

    if not SLIDE.is_file():
        print(f"   embed: {SLIDE} not found")
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        bag_path = Path(tmp) / "bag.h5"
        options = PatchOptions(MPPS, PATCH, TissueOptions(min_fraction=0.0))
        outcome = patch_slide(SLIDE, bag_path, options)
        if outcome.status != "written":
            raise RuntimeError(f"patching failed: {outcome.reason}")
        bag = read_bag(bag_path, features=False)
        counts = [len(level) for level in bag.levels]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sections = [_section(name, bag_path, bag, counts, tmp, device) for name in ENCODERS]
    if (os.cpu_count() or 1) <= 2 and device.type == "cpu":
        sections[-1].notes.append(
            "On 2 cores the encoder's threads take both cores, so reading the next batch on "
            "another thread overlaps little: every path pays reading plus encoding in turn. Ours "
            "reads these patches as the slide's own pixels (each spans 224.45 pixels of this "
            "0.499 µm/px slide: within a pixel of drift), where read_region plus a resize "
            "resamples them. With cores to spare for the reading thread, or the encoder on a GPU, "
            "the reads overlap the encoder (not measured here: no device)."
        )
    return sections
