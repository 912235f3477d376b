"""Training a MagNet from slide labels (DESIGN §4 Training): the trainer's task for the family.

Adam (lr 3e-5 as in the paper; ``options.lr`` overrides it), cosine annealing per step,
batch 16 (3 layers) or 8 (4 layers). The deeper reads happen inside the forward: the model
calls ``read_hi(layer, θ chain)``, answered here from each slide's reader, every slide of
the batch in parallel; a chain computed in the augmented frame is mapped back with
:meth:`~napari_magnet.models.augment.Dihedral.to_original` first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...engine.batches import SlideBatch, amp_dtype, optimizer_step, uint8_to_float
from ...engine.frames import chain_frames, clip_boxes

__all__ = ["PAPER_LR", "MagNetTask"]

#: The paper's learning rate.
PAPER_LR = 3e-5


class MagNetTask:
    """Forward, loss and optimizers of a MagNet."""

    def __init__(self, model, options: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
        cfg = model.config
        self.sizes = (cfg.input_size, model.hi_size(1))
        lr = PAPER_LR if options.lr is None else float(options.lr)
        self.optimizers = {"adam": torch.optim.Adam(model.parameters(), lr=lr)}
        self.schedule_enabled = True
        self.parts = ("classification", "aux", "paradoxical")

    def default_batch_size(self) -> int:
        return 16 if self.model.num_layers <= 3 else 8

    def _read_hi(self, batch: SlideBatch):
        model = self.model

        def read_hi(layer: int, chain: torch.Tensor) -> torch.Tensor:
            chain = chain.detach().float().cpu()
            n = chain.shape[0] // len(batch)
            size = model.hi_size(layer)

            def one(b: int) -> torch.Tensor:
                rows = chain[b * n : (b + 1) * n]
                op = batch.ops[b] if batch.ops else None
                orig = op.to_original(rows) if op is not None else rows
                frames = chain_frames(
                    batch.frames[b],
                    orig[:, :, 2].numpy().astype(np.float64),
                    rows[:, 0, 0].abs().numpy().astype(np.float64),
                )
                visible = clip_boxes(frames, batch.visible[b])
                t = batch.entries[b][1].read(frames, size, visible, device=self.device).pixels
                return op.apply(t) if op is not None else t

            return uint8_to_float(batch.read(one), self.device)

        return read_hi

    def _inputs(self, images: list[torch.Tensor], batch: SlideBatch):
        lo, hi = (uint8_to_float(x, self.device) for x in images)
        if batch.ops:
            lo = torch.stack([op.apply(x) for op, x in zip(batch.ops, lo)])
            hi = torch.stack([op.apply(x) for op, x in zip(batch.ops, hi)])
        return lo, hi

    def loss(self, images, labels, batch: SlideBatch, epoch_gen, amp: bool):
        lo, hi = self._inputs(images, batch)
        with torch.autocast(
            device_type=self.device.type, dtype=amp_dtype(self.device), enabled=amp
        ):
            out = self.model(lo, hi, self._read_hi(batch))
        loss, parts = self.model.loss(out, labels)
        return loss, {k: parts[k] for k in self.parts}, out.probability.detach().float().cpu()

    def backward_step(self, loss, scaler, schedule) -> None:
        optimizer_step(self.optimizers, loss, scaler, schedule)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass
