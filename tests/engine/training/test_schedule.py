"""The cosine learning-rate schedule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_magnet.engine.training import CosineSchedule


def test_cosine_schedule_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=0.1)
    sched = CosineSchedule([opt], total_steps=4)
    lrs = [sched.lr()]
    for _ in range(4):
        sched.step()
        lrs.append(sched.lr())
    assert lrs == pytest.approx(
        [0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05, 0.1 * (1 + np.cos(3 * np.pi / 4)) / 2, 0.0]
    )
    other = CosineSchedule([torch.optim.Adam([p], lr=0.1)], total_steps=4)
    other.load_state_dict(json.loads(json.dumps(sched.state_dict())))
    assert other.lr() == pytest.approx(0.0, abs=1e-12) and other.step_count == 4


def test_a_longer_run_continues_along_the_longer_curve_and_disabled_stays_constant():
    p = torch.nn.Parameter(torch.zeros(2))
    sched = CosineSchedule([torch.optim.Adam([p], lr=0.1)], total_steps=4)
    sched.step()
    sched.step()
    assert sched.lr() == pytest.approx(0.05)
    sched.set_total_steps(8)  # resumed with twice the epochs
    assert sched.lr() == pytest.approx(0.1 * (1 + np.cos(np.pi / 4)) / 2)
    flat = CosineSchedule(
        [torch.optim.Adam([p], lr=0.1), torch.optim.Adam([p], lr=0.2)], total_steps=2, enabled=False
    )
    for _ in range(3):
        flat.step()
    assert flat.factor() == 1.0
    assert [o.param_groups[0]["lr"] for o in flat.optimizers] == [0.1, 0.2]
