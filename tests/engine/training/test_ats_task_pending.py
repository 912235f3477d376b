"""Attention-sampling region and patch reads under augmentation (the family's task).

Pending: these tests use the attention-sampling family's ``ATSTask`` and move to that
family's tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_magnet.engine.cohort import SlidePool, read_cohort
from napari_magnet.engine.training import TrainOptions
from napari_magnet.models.augment import Dihedral
from napari_magnet.models.registry import load_model

from .helpers import letterboxed as _letterboxed


@pytest.mark.parametrize("k,flip", [(1, False), (2, True)])
def test_ats_region_and_patch_reads_follow_the_augmentation(cohort_csv, k, flip):
    """A two-level read at augmented centres shows what the augmented slide shows there."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_magnet.engine.batches import SlideBatch as _Batch
    from napari_magnet.models.ats import ATSTask as _ATSTask

    records = [r for r in read_cohort(cohort_csv) if r.label == 1][:1]
    model = load_model("ats-2level", device="cpu")
    cfg = model.config
    task = _ATSTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    op = Dihedral(k, flip)
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        batch = _Batch(records, pool, [op], threads)
        reader = batch.entries[0][1]
        frame = batch.frames[0]
        size = 1024
        whole = op.apply(_letterboxed(reader, batch.frames[:1], batch.visible[:1], size))
        centres = torch.tensor([[[[0.3, 0.6], [0.55, 0.45]]]])  # (B, 1 parent, 2, 2)
        regions = task._child_frames(batch, [batch.frames[:1]], centres, cfg.region_side)
        got = task._read(batch, regions, cfg.region_size)
        # reference: the augmented whole slide cropped around the same centres
        px = cfg.region_side / (frame[2] - frame[0]) * size
        for i, (cx, cy) in enumerate(centres[0, 0].tolist()):
            x0, y0 = round(cx * size - px / 2), round(cy * size - px / 2)
            crop = whole[:, :, y0:y0 + round(px), x0:x0 + round(px)]
            want = F.interpolate(crop, size=(8, 8), mode="area")
            error = (F.interpolate(got[i:i + 1], size=(8, 8), mode="area") - want).abs().mean()
            assert error < 0.04
        # patches inside an augmented region: the centre of the region is the region's centre
        sub = torch.full((1, 2, 1, 2), 0.5)
        patches = task._child_frames(batch, regions, sub, cfg.patch_side)[0]
        np.testing.assert_allclose((patches[:, :2] + patches[:, 2:]) / 2,
                                   (regions[0][:, :2] + regions[0][:, 2:]) / 2)

