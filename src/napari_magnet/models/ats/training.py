"""Training an attention-sampling model from slide labels (DESIGN §5): the family's task.

Two Adams (lr 1e-3; the attention one with betas (0.999, 0.999)); the attention learns
through the expectation estimator by default, or by REINFORCE (running baseline, entropy
regularisation) with the family option ``ats_learning="reinforce"``. Sampled centres are mapped
back through the slide's augmentation before reading, and each patch transformed with it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...engine.batches import SlideBatch, amp_dtype, optimizer_step, uint8_to_float
from ..family import TrainOption
from .estimators import EMABaseline, make_attention_optimizer, reinforce_attention_loss
from .reads import SlideReads

__all__ = ["DEFAULT_LR", "TRAIN_OPTIONS", "ATSTask", "family_option"]

DEFAULT_LR = 1e-3

#: The family's ``napari-magnet train`` options.
TRAIN_OPTIONS = (
    TrainOption(
        "ats_learning",
        "expectation",
        "how an attention-sampling model learns its attention",
        choices=("expectation", "reinforce"),
    ),
    TrainOption("entropy_weight", 0.01, "REINFORCE entropy regularisation weight", type=float),
)
_DEFAULTS = {option.name: option.default for option in TRAIN_OPTIONS}


def family_option(options: Any, name: str) -> Any:
    """The value of this family's training option ``name`` in ``options`` (its default when
    the run did not set it)."""
    return dict(getattr(options, "family_options", None) or {}).get(name, _DEFAULTS[name])


class ATSTask:
    """Forward, loss and optimizers of an attention-sampling model (expectation or REINFORCE).

    Parameters
    ----------
    model : AttentionSampling
        The model to train.
    options : TrainOptions
        ``ats_learning``, ``lr`` and ``entropy_weight`` are used.
    device : torch.device
        Where the model runs.
    """

    def __init__(self, model, options: Any, device: torch.device) -> None:
        learning = family_option(options, "ats_learning")
        if learning not in ("expectation", "reinforce"):
            raise ValueError(f"ats_learning must be 'expectation' or 'reinforce', got {learning!r}")
        self.model = model
        self.device = device
        self.cfg = model.config
        self.sizes = (self.cfg.view_size,)
        self.mode = learning
        lr = DEFAULT_LR if options.lr is None else float(options.lr)
        self.optimizers = {
            "attention": make_attention_optimizer(model.attention_parameters(), lr=lr),
            "classifier": torch.optim.Adam(model.classifier_parameters(), lr=lr),
        }
        self.schedule_enabled = False
        self.entropy_weight = float(family_option(options, "entropy_weight"))
        self.baseline = EMABaseline(0.9)
        self.parts = ("classification", "attention")

    def default_batch_size(self) -> int:
        """Slides per step unless the options say otherwise."""
        return 8

    def reads(self, batch: SlideBatch) -> SlideReads:
        """The forward's reader callbacks over ``batch``'s slides, following their ops.

        Parameters
        ----------
        batch : SlideBatch
            The step's slides.

        Returns
        -------
        SlideReads
            Reading in parallel through :meth:`SlideBatch.read`.
        """
        return SlideReads(
            self.cfg,
            [entry[1] for entry in batch.entries],
            batch.frames,
            batch.visible,
            self.device,
            ops=batch.ops,
            run=batch.read,
        )

    def loss(self, images, labels, batch: SlideBatch, generator, amp: bool):
        """One step's loss: cross-entropy, plus REINFORCE's attention loss when training.

        Parameters
        ----------
        images : list of Tensor
            ``[views (B, 3, S, S) uint8]`` from the data loader (un-augmented).
        labels : Tensor
            ``(B,)`` slide labels.
        batch : SlideBatch
            The slides (readers, frames, visible boxes, augmentation ops).
        generator : torch.Generator
            Drives the draws.
        amp : bool
            Run the forward under autocast.

        Returns
        -------
        loss : Tensor
            Scalar to back-propagate.
        parts : dict
            ``{"classification": …, "attention": …}`` as floats.
        probability : Tensor
            ``(B,)`` probability of the last class, on the CPU.
        """
        model, cfg = self.model, self.cfg
        view = uint8_to_float(images[0], self.device)
        if batch.ops:
            view = torch.stack([op.apply(x) for op, x in zip(batch.ops, view)])
        target = labels.to(self.device).long()
        reads = self.reads(batch)
        with torch.autocast(
            device_type=self.device.type, dtype=amp_dtype(self.device), enabled=amp
        ):
            out = model(
                view,
                reads.read_patches,
                generator,
                replace=cfg.replace,
                attention_grad=self.mode == "expectation",
                read_regions=reads.read_regions if cfg.two_level else None,
                visible=reads.visible_mask,
            )
            maps = out.attention.float()
            if cfg.two_level:
                maps = torch.cat(
                    [
                        maps.flatten(1),
                        out.region_attention.float().reshape(len(batch), -1) / cfg.n_regions,
                    ],
                    dim=1,
                )
        logits = out.logits
        ce = F.cross_entropy(logits.float(), target)
        att_loss = torch.zeros((), device=ce.device)
        if self.mode == "reinforce" and model.training:
            with torch.no_grad():
                reward = -F.cross_entropy(logits.float(), target, reduction="none")
            b = float(self.baseline) if self.baseline.value is not None else float(reward.mean())
            att_loss = reinforce_attention_loss(
                out.draw_log_probs.float(), reward, b, maps, self.entropy_weight
            )
            self.baseline.update(reward)
        prob = torch.softmax(logits.detach().float(), dim=1)[:, -1].cpu()
        return (
            ce + att_loss,
            {"classification": float(ce.detach()), "attention": float(att_loss.detach())},
            prob,
        )

    def backward_step(self, loss, scaler, schedule) -> None:
        """Zero both optimizers, back-propagate ``loss`` through ``scaler``, step both."""
        optimizer_step(self.optimizers, loss, scaler, schedule)

    def extra_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the weights: the REINFORCE baseline."""
        return {"reinforce_baseline": self.baseline.value}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""
        value = state.get("reinforce_baseline")
        self.baseline.value = None if value is None else float(value)
