"""Fixtures of the trainer's tests: the shared synthetic cohort."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..test_cohort import make_cohort


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory)


@pytest.fixture(scope="package")
def one_epoch_run(tmp_path_factory) -> Path:
    """A finished one-epoch magnet3-lite run on the shared cohort (read-only: copy to modify)."""
    from napari_magnet.engine.training import TrainOptions, train

    run = tmp_path_factory.mktemp("one-epoch") / "run"
    train(
        TrainOptions(
            slides=make_cohort(tmp_path_factory),
            out=run,
            model="magnet3-lite",
            epochs=1,
            batch_size=3,
            lr=1e-3,
            val_fraction=0.25,
            augment=False,
            device="cpu",
            progress=False,
        )
    )
    return run
