"""What a family's training task receives: one step's slides, and tensor helpers.

The trainer (:mod:`napari_magnet.engine.training`) builds a :class:`SlideBatch` per step and
hands it to the family's task (``Family.training_task``); the task reads deeper regions of
each slide through ``batch.entries[b][1]`` (the slide's :class:`~.regions.RegionReader`),
every slide of the batch in parallel with :meth:`SlideBatch.read`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .frames import slide_frame

__all__ = ["RecordBatch", "SlideBatch", "amp_dtype", "optimizer_step", "uint8_to_float"]


def uint8_to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images → float in ``[0, 1]`` on ``device``."""
    return images.to(device, non_blocking=True).float().div_(255.0)


def optimizer_step(optimizers: Any, loss: torch.Tensor, scaler: Any, schedule: Any) -> None:
    """One training step's update: zero every optimizer (a mapping's values, or a sequence),
    back-propagate ``loss`` through the gradient ``scaler``, step each, then ``schedule``."""
    optimizers = list(optimizers.values() if hasattr(optimizers, "values") else optimizers)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()
    schedule.step()


def amp_dtype(device: torch.device) -> torch.dtype:
    """Mixed-precision type on ``device``: bfloat16 where the GPU supports it, else float16."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


class SlideBatch:
    """The slides of one step: records, open readers, layer-1 frames and augmentation ops."""

    def __init__(
        self, records: list[Any], pool: Any, ops: list | None, reader_pool: ThreadPoolExecutor
    ) -> None:
        self.records = records
        self.entries = [pool.get(r.path) for r in records]
        frames, visibles = zip(*(slide_frame(slide) for slide, _ in self.entries))
        self.frames = np.concatenate(frames)
        self.visible = np.concatenate(visibles)
        self.ops = ops
        self.reader_pool = reader_pool

    def __len__(self) -> int:
        return len(self.records)

    def read(self, per_slide: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """Run ``per_slide(b)`` for every slide in parallel and concatenate (batch-major)."""
        parts = list(self.reader_pool.map(per_slide, range(len(self.records))))
        return torch.cat(parts, dim=0)


class RecordBatch:
    """The slides of one step without their pixels, for a task that reads no slide
    (``task.reads_slides`` false): the records and augmentation ops of a
    :class:`SlideBatch`, and no slide opened."""

    def __init__(self, records: list, ops: list | None, reader_pool: Any) -> None:
        self.records = records
        self.ops = ops
        self.reader_pool = reader_pool

    def __len__(self) -> int:
        return len(self.records)
