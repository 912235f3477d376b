"""Training an attention-sampling model from slide labels (DESIGN §5): the family's task.

Two Adams (lr 1e-3; the attention one with betas (0.999, 0.999)); the attention learns
through the expectation estimator by default, or by REINFORCE (running baseline, entropy
regularisation) with ``options.ats_learning == "reinforce"``. Sampled centres are mapped
back through the slide's augmentation before reading, and each patch transformed with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...engine.batches import SlideBatch, amp_dtype, uint8_to_float
from ...engine.frames import patch_frames
from .estimators import (EMABaseline, draw_log_probs, make_attention_optimizer,
                         reinforce_attention_loss)
from .magnify import restrict_to_visible

__all__ = ["DEFAULT_LR", "ATSTask"]

DEFAULT_LR = 1e-3


class ATSTask:
    """Forward, loss and optimizers of an attention-sampling model (expectation or REINFORCE)."""

    def __init__(self, model, options: Any, device: torch.device) -> None:
        if options.ats_learning not in ("expectation", "reinforce"):
            raise ValueError(f"ats_learning must be 'expectation' or 'reinforce', got "
                             f"{options.ats_learning!r}")
        self.model = model
        self.device = device
        self.cfg = model.config
        self.sizes = (self.cfg.view_size,)
        self.mode = options.ats_learning
        lr = DEFAULT_LR if options.lr is None else float(options.lr)
        self.optimizers = {
            "attention": make_attention_optimizer(model.attention_parameters(), lr=lr),
            "classifier": torch.optim.Adam(model.classifier_parameters(), lr=lr),
        }
        self.schedule_enabled = False
        self.entropy_weight = float(options.entropy_weight)
        self.baseline = EMABaseline(0.9)
        self.parts = ("classification", "attention")

    def default_batch_size(self) -> int:
        return 8

    @staticmethod
    def _mask_outside(att: torch.Tensor, batch: SlideBatch, parents: list[np.ndarray]) -> torch.Tensor:
        """Zero and renormalise attention outside the slide; ``parents[b]`` are the level-0
        frames (in the slide's own orientation) slide ``b``'s maps cover, one per map."""
        h, w = att.shape[-2:]
        masks = []
        for b in range(len(batch)):
            op = batch.ops[b] if batch.ops else None
            for frame in parents[b]:
                ones = torch.ones(1, h, w, device=att.device, dtype=torch.float32)
                inside = (restrict_to_visible(ones, frame, batch.visible[b]) > 0).float()
                masks.append(op.apply(inside) if op is not None else inside)
        masked = att * torch.cat(masks).to(att.dtype)
        return masked / masked.sum(dim=(-2, -1), keepdim=True)

    @staticmethod
    def _child_frames(batch: SlideBatch, parents: list[np.ndarray], centres: torch.Tensor,
                      side: float) -> list[np.ndarray]:
        """Level-0 frames of ``side`` around ``centres (B, n_parents, k, 2)``, normalised to
        (augmented) parent frames, for every slide: ``(n_parents * k, 4)`` each, parent-major."""
        c = centres.detach().float().cpu()
        out = []
        for b in range(len(batch)):
            op = batch.ops[b] if batch.ops else None
            frames = []
            for i, parent in enumerate(parents[b]):
                pts = c[b, i]
                if op is not None:  # augmented coords → the slide's own
                    pts = (op.matrix() @ (pts * 2 - 1).T).T.add(1).div(2)
                frames.append(patch_frames(parent, pts.numpy().astype(np.float64), side))
            out.append(np.concatenate(frames))
        return out

    def _read(self, batch: SlideBatch, frames: list[np.ndarray], size: int) -> torch.Tensor:
        def one(b: int) -> torch.Tensor:
            op = batch.ops[b] if batch.ops else None
            visible = np.repeat(batch.visible[b:b + 1], len(frames[b]), axis=0)
            t = batch.entries[b][1].read(frames[b], size, visible, device=self.device).pixels
            return op.apply(t) if op is not None else t

        return uint8_to_float(batch.read(one), self.device)

    def loss(self, images, labels, batch: SlideBatch, generator, amp: bool):
        model, cfg = self.model, self.cfg
        view = uint8_to_float(images[0], self.device)
        if batch.ops:
            view = torch.stack([op.apply(x) for op, x in zip(batch.ops, view)])
        target = labels.to(self.device).long()
        slide_frames = [batch.frames[b:b + 1] for b in range(len(batch))]
        grad = self.mode == "expectation"
        with torch.autocast(device_type=self.device.type, dtype=amp_dtype(self.device),
                            enabled=amp):
            att = self._mask_outside(model.attention(view), batch, slide_frames)
            first = cfg.n_regions if cfg.two_level else cfg.n_patches
            indices, sampled = model.sample(att, first, cfg.replace, generator)
            centres = model.positions_to_centres(indices, att.shape[-2:], view.shape[-2:])
            log_q = draw_log_probs(sampled.float(), cfg.replace)
            maps = att.float()
            if not cfg.two_level:
                frames = self._child_frames(batch, slide_frames, centres[:, None], cfg.patch_side)
                patches = self._read(batch, frames, cfg.patch_size)
                logits, _ = model.classify(patches, att, indices, replace=cfg.replace,
                                           attention_grad=grad)
            else:
                regions = self._child_frames(batch, slide_frames, centres[:, None],
                                             cfg.region_side)
                region_att = self._mask_outside(
                    model.region_attention(self._read(batch, regions, cfg.region_size)),
                    batch, regions)
                region_idx, region_sampled = model.sample(region_att, cfg.n_patches,
                                                          cfg.replace, generator)
                sub = model.positions_to_centres(region_idx, region_att.shape[-2:])
                frames = self._child_frames(batch, regions,
                                            sub.reshape(len(batch), cfg.n_regions, -1, 2),
                                            cfg.patch_side)
                patches = self._read(batch, frames, cfg.patch_size)
                logits, _ = model.classify_two_level(patches, att, indices, region_att,
                                                     region_idx, replace=cfg.replace,
                                                     attention_grad=grad)
                log_q = torch.cat([log_q, draw_log_probs(region_sampled.float(), cfg.replace)
                                   .reshape(len(batch), -1)], dim=1)
                maps = torch.cat([maps.flatten(1), region_att.float()
                                  .reshape(len(batch), -1) / cfg.n_regions], dim=1)
        ce = F.cross_entropy(logits.float(), target)
        att_loss = torch.zeros((), device=ce.device)
        if self.mode == "reinforce" and model.training:
            with torch.no_grad():
                reward = -F.cross_entropy(logits.float(), target, reduction="none")
            b = float(self.baseline) if self.baseline.value is not None \
                else float(reward.mean())
            att_loss = reinforce_attention_loss(log_q, reward, b, maps, self.entropy_weight)
            self.baseline.update(reward)
        prob = torch.softmax(logits.detach().float(), dim=1)[:, -1].cpu()
        return ce + att_loss, {"classification": float(ce.detach()),
                               "attention": float(att_loss.detach())}, prob

    def backward_step(self, loss, scaler, schedule) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for opt in self.optimizers.values():
            scaler.step(opt)
        scaler.update()
        schedule.step()

    def extra_state(self) -> dict[str, Any]:
        return {"reinforce_baseline": self.baseline.value}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        value = state.get("reinforce_baseline")
        self.baseline.value = None if value is None else float(value)
