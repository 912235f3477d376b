"""MagNet's region reads under augmentation, and its training-time forward against magnify."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_magnet.engine.cohort import SlidePool, read_cohort
from napari_magnet.engine.frames import chain_frames
from napari_magnet.engine.training import TrainOptions
from napari_magnet.models.augment import Dihedral
from napari_magnet.models.registry import load_model
from tests.engine.test_cohort import make_cohort
from tests.engine.training.helpers import letterboxed as _letterboxed


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory):
    return make_cohort(tmp_path_factory)


@pytest.mark.parametrize("k,flip", [(0, False), (1, False), (2, True), (3, True)])
def test_region_reads_follow_the_augmentation(cohort_csv, k, flip):
    """read_hi for an augmented forward shows what the augmented slide shows at the θ chain."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_magnet.engine.batches import SlideBatch as _Batch
    from napari_magnet.models.magnet import MagNetTask as _MagNetTask

    records = [r for r in read_cohort(cohort_csv) if r.label == 1][:1]
    model = load_model("magnet3-lite", device="cpu")
    task = _MagNetTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    op = Dihedral(k, flip)
    chain = torch.tensor(
        [[[0.3, 0.0, 0.35], [0.0, 0.3, -0.4]], [[0.5, 0.0, -0.2], [0.0, 0.5, 0.1]]]
    )
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        batch = _Batch(records, pool, [op], threads)
        got = task._read_hi(batch)(2, chain)  # (2, 3, 112, 112)
        plain = _Batch(records, pool, None, threads)
        reader = batch.entries[0][1]
        whole = _letterboxed(reader, batch.frames[:1], batch.visible[:1], 2048)
        # reference: sample the augmented whole slide at the chain
        grid = F.affine_grid(chain, [2, 3, 112, 112], align_corners=False)
        want = F.grid_sample(
            op.apply(whole).expand(2, -1, -1, -1), grid, mode="bilinear", align_corners=False
        )

        # compare at 14 x 14 (the texture aliases differently in the two resamplings)
        def low(x):
            return F.avg_pool2d(x, 8)

        error = (low(got) - low(want)).abs().mean()
        assert error < 0.03
        if op != Dihedral():
            # without mapping the chain back, the read would show another place
            wrong = op.apply(task._read_hi(plain)(2, chain))
            assert (low(wrong) - low(want)).abs().mean() > 2 * error
        # chain_frames: the chain's box in level-0 pixels
        frames = chain_frames(batch.frames[0], np.array([[0.35, -0.4]]), np.array([0.3]))
        f = batch.frames[0]
        w = f[2] - f[0]
        np.testing.assert_allclose(
            frames[0], [f[0] + w * 0.525, f[1] + w * 0.15, f[0] + w * 0.825, f[1] + w * 0.45]
        )


def test_validation_forward_matches_magnify(cohort_csv):
    """The batched training-time forward (eval mode) gives magnify's probability."""
    from concurrent.futures import ThreadPoolExecutor

    from napari_magnet import magnify, open_slide
    from napari_magnet.engine.batches import SlideBatch as _Batch
    from napari_magnet.engine.cohort import SlideDataset
    from napari_magnet.engine.types import MagnifyResult
    from napari_magnet.models.magnet import MagNetTask as _MagNetTask

    records = read_cohort(cohort_csv)[:3]
    model = load_model("magnet3-lite", device="cpu").eval()
    task = _MagNetTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        dataset = SlideDataset(records, task.sizes, pool)
        images = [torch.stack([dataset[i]["images"][j] for i in range(3)]) for j in range(2)]
        batch = _Batch(records, pool, None, threads)
        with torch.inference_mode():
            _, _, prob = task.loss(images, torch.zeros(3), batch, None, False)
    for record, p in zip(records, prob.tolist()):
        with open_slide(record.path) as slide:
            result = [
                x for x in magnify(slide, model, device="cpu") if isinstance(x, MagnifyResult)
            ][0]
        assert p == pytest.approx(result.probability, abs=2e-3)
