"""The learning-rate schedule of a run: cosine annealing per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["CosineSchedule"]


class CosineSchedule:
    """Cosine annealing per optimizer step: ``lr_t = base · (1 + cos(π t / T)) / 2``.

    Applied to every param group of the given optimizers; ``total_steps`` can change on
    resume (a run extended to more epochs continues along the longer curve, see
    :meth:`set_total_steps`).

    Parameters
    ----------
    optimizers : sequence of torch.optim.Optimizer
        Their param groups' current learning rates are the base rates.
    total_steps : int
        ``T``, the steps of the whole run (at least 1).
    enabled : bool
        ``False`` leaves the learning rates alone: they stay as the task set them, or as
        the task's own rule changes them (e.g. a plateau rule in ``end_epoch``); the
        schedule then only counts steps.
    """

    def __init__(
        self, optimizers: Sequence[torch.optim.Optimizer], total_steps: int, enabled: bool = True
    ) -> None:
        self.optimizers = list(optimizers)
        self.base_lrs = [[float(g["lr"]) for g in o.param_groups] for o in self.optimizers]
        self.total_steps = max(int(total_steps), 1)
        self.step_count = 0
        self.enabled = bool(enabled)
        self._apply()

    def factor(self) -> float:
        """Current multiplier of the base learning rates.

        Returns
        -------
        float
            In ``[0, 1]``; 1 when the schedule is disabled.
        """
        if not self.enabled:
            return 1.0
        t = min(self.step_count, self.total_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t / self.total_steps))

    def _apply(self) -> None:
        if not self.enabled:
            return  # the task owns the rates (a resumed one comes back with its optimizer)
        f = self.factor()
        for opt, bases in zip(self.optimizers, self.base_lrs):
            for g, base in zip(opt.param_groups, bases):
                g["lr"] = base * f

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def set_total_steps(self, total_steps: int) -> None:
        """Change ``T`` (a resumed run asked for another number of epochs) and re-apply.

        Parameters
        ----------
        total_steps : int
            The steps of the whole run, taken as is.
        """
        self.total_steps = total_steps
        self._apply()

    def lr(self) -> float:
        """Learning rate of the first param group.

        Returns
        -------
        float
            The current rate.
        """
        return float(self.optimizers[0].param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready state (base rates, ``T``, steps taken, enabled)."""
        return {
            "base_lrs": self.base_lrs,
            "total_steps": self.total_steps,
            "step_count": self.step_count,
            "enabled": self.enabled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (``total_steps`` is kept as is).

        Parameters
        ----------
        state : dict
            A :meth:`state_dict`, possibly through JSON.
        """
        self.base_lrs = [[float(v) for v in group] for group in state["base_lrs"]]
        self.step_count = int(state["step_count"])
        self.enabled = bool(state.get("enabled", True))
        self._apply()
