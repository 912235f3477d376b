"""The attention-sampling family's training task: reads under augmentation, and its forward
against Magnify's (one pipeline, two callers)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_magnet import magnify, open_slide
from napari_magnet.engine.batches import SlideBatch
from napari_magnet.engine.cohort import SlideDataset, SlidePool, read_cohort
from napari_magnet.engine.frames import clip_boxes
from napari_magnet.engine.training import TrainOptions
from napari_magnet.engine.types import MagnifyResult, MagnifyStep
from napari_magnet.models.ats import ATSConfig, ATSTask, SlideReads
from napari_magnet.models.augment import Dihedral
from napari_magnet.models.registry import load_model

from ...engine.test_cohort import make_cohort


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory)


def letterboxed(reader, frame, visible, size):
    """The slide's start frame as a float image (1, 3, size, size) in [0, 1]."""
    img = reader.read(frame, size, visible).images[0]
    return torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255


@pytest.mark.parametrize("k,flip", [(1, False), (2, True)])
def test_ats_region_and_patch_reads_follow_the_augmentation(cohort_csv, k, flip):
    """A two-level read at augmented centres shows what the augmented slide shows there."""
    records = [r for r in read_cohort(cohort_csv) if r.label == 1][:1]
    model = load_model("ats-2level", device="cpu")
    cfg = model.config
    task = ATSTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    op = Dihedral(k, flip)
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        batch = SlideBatch(records, pool, [op], threads)
        reads = task.reads(batch)
        reader = batch.entries[0][1]
        frame = batch.frames[0]
        size = 1024
        whole = op.apply(letterboxed(reader, batch.frames[:1], batch.visible[:1], size))
        centres = torch.tensor([[[0.3, 0.6], [0.55, 0.45]]])  # (B, N1, 2), augmented view
        got = reads.read_regions(centres)
        assert got.shape == (2, 3, cfg.region_size, cfg.region_size)
        # reference: the augmented whole slide cropped around the same centres
        px = cfg.region_side / (frame[2] - frame[0]) * size
        for i, (cx, cy) in enumerate(centres[0].tolist()):
            x0, y0 = round(cx * size - px / 2), round(cy * size - px / 2)
            crop = whole[:, :, y0 : y0 + round(px), x0 : x0 + round(px)]
            want = F.interpolate(crop, size=(8, 8), mode="area")
            error = (F.interpolate(got[i : i + 1], size=(8, 8), mode="area") - want).abs().mean()
            assert error < 0.04
        # patches inside an augmented region: the centre of the region is the region's centre
        patches = reads.read_patches(centres, torch.full((2, 1, 2), 0.5))
        assert patches.shape == (2, 3, cfg.patch_size, cfg.patch_size)
        regions, inside = reads.region_frames[0], reads.patch_frames[0]
        np.testing.assert_allclose(
            (inside[:, :2] + inside[:, 2:]) / 2, (regions[:, :2] + regions[:, 2:]) / 2
        )


class FakeReader:
    """Records the frames it is asked for; returns uint8 images of the frame's index."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def read(self, frames, size, visible, device=None):
        self.frames.append(np.array(frames))
        pixels = torch.arange(len(frames), dtype=torch.uint8).reshape(-1, 1, 1, 1)
        return SimpleNamespace(
            pixels=pixels.expand(-1, 3, size, size).clone(),
            levels=np.zeros(len(frames), dtype=np.int64),
        )


@pytest.mark.parametrize("k,flip", [(0, False), (1, False), (3, True)])
def test_slide_reads_map_centres_and_masks_through_the_op(k, flip):
    """Under an op, centres go back to the slide's own orientation before the frame is made,
    and the visibility mask is the slide's own, transformed like the view."""
    cfg = ATSConfig(
        patch_size=4,
        n_patches=2,
        patch_level_scale=10.0,
        two_level=True,
        n_regions=2,
        region_size=8,
        region_level_scale=20.0,
    )
    op = Dihedral(k, flip)
    frames = np.array([[0.0, 0.0, 800.0, 800.0]])
    visible = np.array([[0.0, 200.0, 800.0, 600.0]])  # a 2:1 slide letterboxed in its frame
    reader = FakeReader()
    reads = SlideReads(cfg, [reader], frames, visible, torch.device("cpu"), ops=[op])
    # the view's mask: the slide's own rows 2..5 of 8, transformed by the op
    mask = reads.visible_mask(torch.zeros(1, 8, 8), 1)
    own = torch.zeros(1, 8, 8)
    own[:, 2:6] = 1
    assert torch.equal(mask, op.apply(own))
    # a centre in the augmented view is read where the op says it comes from
    centre = torch.tensor([[[0.25, 0.75]]])
    reads.read_patches(centre)
    back = (op.matrix() @ (centre[0, 0] * 2 - 1)).add(1).div(2).double().numpy()
    np.testing.assert_allclose(
        (reader.frames[-1][0, :2] + reader.frames[-1][0, 2:]) / 2, back * 800, atol=1e-4
    )
    np.testing.assert_allclose(reader.frames[-1][0, 2:] - reader.frames[-1][0, :2], 40.0)
    # the regions' masks are made over the regions read last (rows outside the slide: 0)
    reads.read_regions(torch.tensor([[[0.5, 0.5], [0.5, 0.3]]]))
    np.testing.assert_allclose(reads.region_frames[0][:, 2] - reads.region_frames[0][:, 0], 160)
    masks = reads.visible_mask(torch.zeros(2, 8, 8), 2)
    assert masks.shape == (2, 8, 8)
    assert float(masks[0].sum()) == 64  # the centre region lies inside the slide
    # the other comes from y = 0.3 of the slide's own frame (its top 2 rows outside) when
    # k = 0, from x = 0.7 (all inside) when the op turns the view a quarter
    assert float(masks[1].sum()) == (48 if k % 2 == 0 else 64)


@pytest.mark.parametrize("name", ["ats", "ats-2level"])
def test_validation_forward_matches_magnify(cohort_csv, name):
    """The training task's forward (eval mode, one slide, no augmentation) draws what Magnify
    draws with the same seed, and gives Magnify's probability."""
    records = read_cohort(cohort_csv)[:2]
    model = load_model(name, device="cpu").eval()
    cfg = model.config
    task = ATSTask(model, TrainOptions(slides="", out=""), torch.device("cpu"))
    with SlidePool() as pool, ThreadPoolExecutor(2) as threads:
        dataset = SlideDataset(records, task.sizes, pool)
        for i, record in enumerate(records):
            images = [dataset[i]["images"][0][None]]
            batch = SlideBatch([record], pool, None, threads)
            reads = task.reads(batch)
            generator = torch.Generator().manual_seed(0)
            with torch.inference_mode():
                _, _, prob = task.loss(images, torch.zeros(1), batch, generator, False)
                view = images[0].float().div(255)
                out = model(
                    view,
                    reads.read_patches,
                    torch.Generator().manual_seed(0),
                    read_regions=reads.read_regions if cfg.two_level else None,
                    visible=reads.visible_mask,
                )
            with open_slide(record.path) as slide:
                items = list(magnify(slide, model, device="cpu", seed=0))
            steps = [x for x in items if isinstance(x, MagnifyStep)]
            result = items[-1]
            assert isinstance(result, MagnifyResult)
            assert float(prob[0]) == pytest.approx(result.probability, abs=1e-5)
            np.testing.assert_allclose(
                steps[0].attention_maps[0], out.attention[0].numpy(), rtol=1e-4, atol=1e-9
            )
            first = reads.region_frames if cfg.two_level else reads.patch_frames
            np.testing.assert_allclose(steps[0].boxes, clip_boxes(first[0], batch.visible[0]))
            if cfg.two_level:
                assert len(steps) == 2
                np.testing.assert_allclose(steps[1].attention_boxes, reads.region_frames[0])
