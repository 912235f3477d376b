"""Slides for a run: the slide pools and their memory budget, the data loader, seeded RNGs.

The cohort itself (CSV, split, :class:`~napari_magnet.engine.cohort.SlidePool`,
:class:`~napari_magnet.engine.cohort.SlideDataset`) is :mod:`napari_magnet.engine.cohort`'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..cohort import SlideDataset, SlidePool

__all__ = [
    "OPEN_SLIDE_OVERHEAD",
    "TRAIN_CACHE_ENV",
    "epoch_rng",
    "seed_global_torch",
    "seeded_generator",
    "slide_pools",
    "train_cache_budget",
]

#: Environment variable: MB of memory a training run may spend keeping its slides open across
#: epochs (default: a quarter of the machine's memory, at most 12 GiB).
TRAIN_CACHE_ENV = "NAPARI_MAGNET_TRAIN_CACHE_MB"
#: Memory an open slide holds besides its decoded-chunk cache: its reader's two threads (and
#: their malloc arenas), the file's decoder and OpenSlide state. Measured on the synthetic
#: 8192² slides: about 25 MB.
OPEN_SLIDE_OVERHEAD = 32 * 2**20


# ----------------------------------------------------------------------------- seeded RNGs


def _seed_value(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0])


def epoch_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator drawn from ``(seed, *keys)`` (e.g. ``(seed, epoch)``).

    Parameters
    ----------
    seed : int
        The run's seed.
    *keys : int
        What else the stream depends on (epoch, purpose).

    Returns
    -------
    numpy.random.Generator
        The same stream for the same arguments, in any process.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


def seeded_generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` seeded from ``(seed, *keys)``.

    Parameters
    ----------
    seed : int
        The run's seed.
    *keys : int
        What else the stream depends on (epoch, purpose).
    device : torch.device or str
        Where it generates.

    Returns
    -------
    torch.Generator
        Seeded with the first word of ``SeedSequence([seed, *keys])``.
    """
    return torch.Generator(device=device).manual_seed(_seed_value(seed, *keys))


def seed_global_torch(seed: int, *keys: int) -> None:
    """Seed torch's global RNG from ``(seed, *keys)`` (what draws without a generator use)."""
    torch.manual_seed(_seed_value(seed, *keys))


# ----------------------------------------------------------------------------- slide pools


def train_cache_budget() -> int:
    """Bytes a training run may spend keeping slides open.

    Returns
    -------
    int
        ``$NAPARI_MAGNET_TRAIN_CACHE_MB`` (:data:`TRAIN_CACHE_ENV`) in bytes, else a quarter
        of the machine's memory, at most 12 GiB.

    Raises
    ------
    ValueError
        The variable is not a number of MB >= 0.
    """
    env = os.environ.get(TRAIN_CACHE_ENV)
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"{TRAIN_CACHE_ENV} must be a number of MB, got {env!r}") from None
        if not mb >= 0:
            raise ValueError(f"{TRAIN_CACHE_ENV} must be a number of MB >= 0, got {env!r}")
        return int(mb * 2**20)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        ram = 16 * 2**30
    return int(min(12 * 2**30, ram // 4))


def slide_pools(
    n_slides: int, batch_size: int, workers: int, rule: str = "enough"
) -> tuple[SlidePool, SlidePool]:
    """The run's slide pools.

    The region pool (the main process's magnifying reads) keeps as many of the run's slides
    open, chunks cached, as :func:`train_cache_budget` holds at the cache's limit plus
    :data:`OPEN_SLIDE_OVERHEAD` each, and never fewer than a batch needs: re-decoding every
    slide every epoch starved the GPU. Layer 1's reads come from the DataLoader; with worker
    processes each worker opens its own slides, so they get a small pool of their own
    (layer 1 reads the coarsest levels, cheap to reopen) instead of a copy of the big one,
    whose memory would count once per worker.

    Parameters
    ----------
    n_slides : int
        Slides of the run (training and validation).
    batch_size : int
        Slides per step.
    workers : int
        DataLoader worker processes.
    rule : {"enough", "paper"}
        Pyramid level rule of the pools' readers.

    Returns
    -------
    region_pool, layer1_pool : SlidePool
        The same object when ``workers`` is 0.
    """
    per_slide = SlidePool.DEFAULT_CACHE_BYTES + OPEN_SLIDE_OVERHEAD
    keep_open = min(n_slides, train_cache_budget() // per_slide)
    pool = SlidePool(max_open=max(2 * batch_size, 16, keep_open), rule=rule)
    if workers <= 0:
        return pool, pool
    return pool, SlidePool(max_open=max(batch_size, 8), rule=rule)


# ----------------------------------------------------------------------------- data loader


def _collate(items: list[dict]) -> dict:
    return {
        "images": [
            torch.stack([it["images"][k] for it in items]) for k in range(len(items[0]["images"]))
        ],
        "label": torch.stack([it["label"] for it in items]),
        "index": torch.stack([it["index"] for it in items]),
    }


class _EpochOrder(torch.utils.data.Sampler):
    """The slide order of the current epoch (set before each pass)."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class _Loader:
    """One DataLoader per dataset for the whole run, so worker processes (and the slides they
    have open) persist across epochs; :meth:`epoch` sets the order of the next pass."""

    def __init__(self, dataset: SlideDataset, batch_size: int, workers: int) -> None:
        from torch.utils.data import DataLoader

        self.sampler = _EpochOrder()
        # Workers come from a fork server, not a fork of this process: a fork taken while the
        # region-reading threads and torch's thread pools exist can inherit a held lock and
        # hang (seen on a second train() in one process).
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            multiprocessing_context="forkserver" if workers > 0 else None,
        )

    def epoch(self, order: Sequence[int]):
        """The loader, set to yield the slides of ``order`` (dataset indices) in batches."""
        self.sampler.order = [int(i) for i in order]
        return self.loader
