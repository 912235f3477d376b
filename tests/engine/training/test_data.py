"""Slides for a run: pools within the memory budget, the persistent loader, seeded RNGs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_magnet.engine.cohort import SlidePool
from napari_magnet.engine.training.data import _collate, _Loader, epoch_rng, seeded_generator

from .helpers import metrics


def test_two_runs_with_worker_processes_in_one_process_do_not_hang(cohort_csv, tmp_path):
    """DataLoader workers come from a fork server and persist across epochs; a second
    train() in the same process (a notebook, a sweep) used to hang in a forked worker."""
    run = tmp_path / "w"
    script = tmp_path / "twice.py"
    script.write_text(
        "from napari_magnet.engine.training import TrainOptions, train\n"
        "if __name__ == '__main__':\n"
        f"    kw = dict(slides={str(cohort_csv)!r}, out={str(run)!r}, batch_size=3, lr=1e-3,\n"
        "              device='cpu', progress=False, val_fraction=0.25, workers=4)\n"
        "    train(TrainOptions(model='ats', epochs=2, **kw))\n"
        f"    train(TrainOptions(resume={str(run)!r}, epochs=3, **kw))\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], timeout=300, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [int(r["epoch"]) for r in metrics(run)] == [1, 2, 3]


def test_slide_pools_fit_the_memory_budget_and_workers_do_not_copy_it(monkeypatch):
    from napari_magnet.engine.training import (
        OPEN_SLIDE_OVERHEAD,
        TRAIN_CACHE_ENV,
        slide_pools,
        train_cache_budget,
    )

    per_slide = SlidePool().cache_bytes + OPEN_SLIDE_OVERHEAD  # the default cache
    monkeypatch.setenv(TRAIN_CACHE_ENV, str(40 * per_slide / 2**20))
    assert train_cache_budget() == 40 * per_slide
    pool, layer1 = slide_pools(400, 16, workers=0)
    assert pool is layer1 and pool.max_open == 40  # what 40 slides' memory holds
    pool, layer1 = slide_pools(25, 16, workers=4)
    assert pool.max_open == 32  # never fewer than two batches need
    assert layer1 is not pool and layer1.max_open == 16  # each worker's own, small
    monkeypatch.setenv(TRAIN_CACHE_ENV, "lots")
    with pytest.raises(ValueError, match=TRAIN_CACHE_ENV):
        train_cache_budget()
    monkeypatch.delenv(TRAIN_CACHE_ENV)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert train_cache_budget() == min(12 * 2**30, ram // 4)


def test_the_loader_yields_each_epochs_order_and_collates_per_layer():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {
                "images": [
                    torch.full((3, 4, 4), i, dtype=torch.uint8),
                    torch.full((3, 2, 2), i, dtype=torch.uint8),
                ],
                "label": torch.tensor(i % 2),
                "index": torch.tensor(i),
            }

    loader = _Loader(Items(), batch_size=2, workers=0)
    for order in ([4, 0, 2, 1, 3], [1, 2]):
        batches = list(loader.epoch(order))
        assert [b["index"].tolist() for b in batches] == [
            order[i : i + 2] for i in range(0, len(order), 2)
        ]
        first = batches[0]
        assert [tuple(x.shape) for x in first["images"]] == [(2, 3, 4, 4), (2, 3, 2, 2)]
        assert first["images"][1][:, 0, 0, 0].tolist() == order[:2]
    assert _collate([Items()[3]])["label"].tolist() == [1]


def test_seeded_streams_depend_on_seed_and_keys_only():
    a = epoch_rng(0, 3).permutation(10).tolist()
    assert a == epoch_rng(0, 3).permutation(10).tolist()
    assert a != epoch_rng(0, 4).permutation(10).tolist()
    assert a != epoch_rng(1, 3).permutation(10).tolist()
    x = torch.rand(4, generator=seeded_generator(7, 1, 2))
    assert torch.equal(x, torch.rand(4, generator=seeded_generator(7, 1, 2)))
    assert not torch.equal(x, torch.rand(4, generator=seeded_generator(7, 1, 3)))
    expected = int(np.random.SeedSequence([7, 1, 2]).generate_state(1)[0])
    assert seeded_generator(7, 1, 2).initial_seed() == expected
