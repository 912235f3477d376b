"""Test-only references for attention sampling: biased estimators and a bare REINFORCE loop.

The package trains with :class:`~napari_magnet.models.ats.ATSTask`; these exist so that the
tests can show what the package's estimators and wiring get right (the biased gradients of
the published implementation and of the pathwise-only estimate; a minimal two-optimizer
REINFORCE step on a model fed by reader callbacks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from napari_magnet.models.ats.estimators import (
    EMABaseline,
    _check,
    _expand,
    _remaining_mass,
    ats_terms,
    make_attention_optimizer,
    reinforce_attention_loss,
)


def naive_expected_without_replacement(features: Tensor, sampled_attention: Tensor) -> Tensor:
    """The ATS estimate back-propagated through its weights only (pathwise, no score term).

    Unbiased value, **biased gradient**: it ignores that the attention also decides which
    positions are drawn.
    """
    return ats_terms(features, sampled_attention).mean(dim=1)


class _PublishedWithoutReplacement(torch.autograd.Function):
    """The gradient of the published TF implementation (``_expected_without_replacement``).

    Uniform weights ``w_i = 1/N``; with ``pm_i = 1 − Σ_{j<i} a_j`` and the estimates ``F_i``:
    ``∂/∂a_i = w_i · g · (F_i · pm_i / a_i + Σ_{j<i} f_j − i · f_i)`` and
    ``∂/∂f_i = w_i · (pm_i + (N − 1 − i) a_i) · g``. Biased in expectation (shown by the tests).
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor, sampled_attention: Tensor) -> Tensor:
        terms = ats_terms(features, sampled_attention)
        ctx.save_for_backward(features, sampled_attention, terms)
        return terms.mean(dim=1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        features, a, terms = ctx.saved_tensors
        n = a.shape[1]
        w = 1.0 / n
        pm = _remaining_mass(a)
        g = grad.unsqueeze(1)  # (B, 1, *D)
        idx = torch.arange(n, dtype=a.dtype, device=a.device)
        ga1 = terms / _expand(a / pm, features)
        ga2 = (torch.cumsum(features, dim=1) - features) - _expand(
            idx.expand_as(a), features
        ) * features
        ga = (g * (ga1 + ga2)).flatten(2).sum(dim=2) * w
        rev = (n - 1 - idx).expand_as(a)
        gf = w * _expand(pm + rev * a, features) * g
        return gf, ga


def published_expected_without_replacement(features: Tensor, sampled_attention: Tensor) -> Tensor:
    """The ATS estimate with the published (biased) custom gradient."""
    _check(features, sampled_attention)
    return _PublishedWithoutReplacement.apply(features, sampled_attention)


def reinforce_step(
    optimizer: torch.optim.Optimizer,
    log_probs: Tensor,
    reward: Tensor,
    baseline: EMABaseline,
    attention: Tensor | None = None,
    entropy_weight: float = 0.0,
) -> float:
    """One REINFORCE update of the attention: loss with the current baseline, step, update baseline.

    The baseline used in the loss is the value *before* this reward is folded in, so it does not
    depend on the current draw (keeping the gradient unbiased). On the first call it is the
    first reward itself (advantage 0, only the entropy term acts). Returns the loss.
    """
    b = float(baseline) if baseline.value is not None else float(reward.detach().float().mean())
    loss = reinforce_attention_loss(log_probs, reward, b, attention, entropy_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    baseline.update(reward)
    return float(loss.detach())


class ReinforceTrainer:
    """Train an :class:`~napari_magnet.models.ats.AttentionSampling` model with REINFORCE.

    Two Adam optimizers (DESIGN §5): the attention network's (lr 1e-3, betas (0.999, 0.999))
    learns from ``−(r − b) log P(s) + λ Σ a log a``; the feature network and classifier (lr 1e-3,
    default betas) learn from the cross-entropy of the logits, computed with the attention
    detached so that the attention learns only through REINFORCE.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float = 1e-3,
        entropy_weight: float = 1e-2,
        baseline_decay: float = 0.9,
        reward_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        self.model = model
        self.attention_optimizer = make_attention_optimizer(model.attention_parameters(), lr=lr)
        self.classifier_optimizer = torch.optim.Adam(model.classifier_parameters(), lr=lr)
        self.entropy_weight = float(entropy_weight)
        self.baseline = EMABaseline(baseline_decay)
        self.reward_fn = reward_fn or (
            lambda logits, target: (
                -torch.nn.functional.cross_entropy(logits, target, reduction="none")
            )
        )

    def step(
        self,
        view: Tensor,
        read_patches: Callable[[Tensor], Tensor],
        target: Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """One training step on a batch; returns the losses, mean reward and baseline."""
        self.model.train()
        out = self.model(view, read_patches, generator=generator, attention_grad=False)
        ce = torch.nn.functional.cross_entropy(out.logits, target)
        with torch.no_grad():
            reward = self.reward_fn(out.logits.detach(), target)
        b = (
            float(self.baseline)
            if self.baseline.value is not None
            else float(reward.float().mean())
        )
        att_loss = reinforce_attention_loss(
            out.draw_log_probs, reward, b, out.attention, self.entropy_weight
        )
        self.attention_optimizer.zero_grad(set_to_none=True)
        self.classifier_optimizer.zero_grad(set_to_none=True)
        (ce + att_loss).backward()  # disjoint parameter sets: each loss reaches only its own
        self.attention_optimizer.step()
        self.classifier_optimizer.step()
        self.baseline.update(reward)
        return {
            "loss": float(ce.detach()),
            "attention_loss": float(att_loss.detach()),
            "reward": float(reward.float().mean()),
            "baseline": float(self.baseline),
        }
