"""The trainer's optional task hooks: slides never opened, the task's epoch order, a
learning rate the task owns (the end-to-end use is in tests/models/zoommil/test_training.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_magnet.engine.batches import RecordBatch
from napari_magnet.engine.cohort import SlideDataset, SlidePool, SlideRecord, read_cohort
from napari_magnet.engine.training import CosineSchedule
from napari_magnet.engine.training.data import _collate, epoch_rng
from napari_magnet.engine.training.loop import _epoch_order


def test_a_dataset_without_sizes_opens_no_slide(cohort_csv, tmp_path):
    records = read_cohort(cohort_csv)[:3]
    pool = SlidePool(max_open=4)
    items = [SlideDataset(records, (), pool)[i] for i in range(3)]
    assert not pool._open  # nothing was opened
    batch = _collate(items)
    assert batch["images"] == []
    assert batch["label"].tolist() == [float(r.label) for r in records]
    assert batch["index"].tolist() == [0, 1, 2]
    # a slide that does not exist is not even looked at ...
    ghost = SlideRecord(tmp_path / "no-such-slide.tif", 1, "positive")
    assert SlideDataset([ghost], ())[0]["images"] == []
    # ... while with sizes the slide is read
    with pytest.raises(Exception, match="no-such-slide"):
        SlideDataset([ghost], (32,))[0]
    item = SlideDataset(records, (32,), pool)[0]
    assert item["images"][0].shape == (3, 32, 32) and len(pool._open) == 1
    pool.close()
    assert len(RecordBatch(records, None, None)) == 3


class _Task:
    def __init__(self, order=None):
        if order is not None:
            self.epoch_order = order


def test_the_epoch_order_is_the_tasks_or_the_uniform_permutation():
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    # without the hook: what the trainer always drew
    assert _epoch_order(_Task(), labels, epoch_rng(7, 3)) == epoch_rng(7, 3).permutation(8).tolist()
    seen = {}

    def weighted(lab, rng):
        seen["labels"] = lab.tolist()
        return rng.choice(len(lab), size=len(lab), p=np.where(lab == 1, 0.5 / 2, 0.5 / 6))

    order = _epoch_order(_Task(weighted), labels, epoch_rng(7, 3))
    assert seen["labels"] == labels.tolist() and len(order) == 8
    assert order == _epoch_order(_Task(weighted), labels, epoch_rng(7, 3))  # seeded by (seed, e)
    assert order != _epoch_order(_Task(weighted), labels, epoch_rng(7, 4))
    with pytest.raises(ValueError, match="outside"):
        _epoch_order(_Task(lambda lab, rng: [0, 8]), labels, epoch_rng(7, 3))
    with pytest.raises(ValueError, match="0 indices"):
        _epoch_order(_Task(lambda lab, rng: []), labels, epoch_rng(7, 3))


def test_a_disabled_schedule_leaves_the_rate_to_the_task():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.1)
    flat = CosineSchedule([opt], total_steps=4, enabled=False)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    plateau.step(1.0)
    plateau.step(1.0)  # no improvement: halved
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    flat.step()  # the schedule's step must not put the base rate back
    assert flat.lr() == pytest.approx(0.05) and flat.step_count == 1
    # a resumed run: the optimizer comes back with its rate, the schedule keeps it
    saved = json.loads(json.dumps(flat.state_dict()))
    opt2 = torch.optim.Adam([p], lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    again = CosineSchedule([opt2], total_steps=4, enabled=False)
    again.load_state_dict(saved)
    again.set_total_steps(8)
    assert again.lr() == pytest.approx(0.05) and again.step_count == 1
    # an enabled one still anneals from its base rate
    cosine = CosineSchedule([torch.optim.Adam([p], lr=0.1)], total_steps=2)
    cosine.step()
    assert cosine.lr() == pytest.approx(0.05)
