"""Differentiable top-K by perturbed optimizers (DESIGN §9).

Cordonnier et al., *Differentiable Patch Selection for Image Recognition*, CVPR 2021, after
Berthet et al., *Learning with Differentiable Perturbed Optimizers*, NeurIPS 2020.

The hard top-K of a score vector ``s`` (``n`` entries) is written as an indicator matrix
``Y(s)`` of shape ``(K, n)``: row ``j`` is the one-hot vector of the ``j``-th largest score
(rows in **descending score order**: row 0 is the best patch). ``Y`` is piecewise constant, so
it is smoothed by Gaussian noise:

    Ȳ(s) = E_Z[Y(s + σ Z)],   Z ~ N(0, I_n),

estimated by the mean over ``samples`` noisy copies. Row ``j`` of the estimate is then the
frequency with which each patch is the ``j``-th largest of a noisy copy: every row sums to 1,
every column to at most 1 (a patch takes at most one rank per copy), and as ``σ → 0`` the
estimate tends to the hard indicator (when the scores are distinct).

Its Jacobian is ``∂Ȳ/∂s = E[Y(s + σZ) ⊗ Z] / σ`` (Gaussian integration by parts), so the
backward pass contracts the incoming gradient ``G`` (``(K, n)``) with the same noise:

    ∂⟨G, Ȳ⟩/∂s = E[⟨G, Y(s + σZ)⟩ Z] / σ,

which is the exact gradient of the smoothed objective ``F(s) = E[⟨G, Y(s + σZ)⟩]`` estimated
with the forward pass's own draws. σ applies to the **unnormalised** scores (not to softmax
outputs, whose scale ≈ 1/n would make the noise level depend on the bag's size).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["PerturbedTopK", "hard_topk", "hard_topk_indicator", "perturbed_topk"]


def hard_topk(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` largest scores, by descending score.

    Parameters
    ----------
    scores : Tensor
        ``(n,)`` scores.
    k : int
        How many (at most ``n``).

    Returns
    -------
    Tensor
        ``(k,)`` int64 positions; position ``0`` holds the largest score.
    """
    k = _checked_k(scores, k)
    return torch.topk(scores.detach(), k, dim=-1, largest=True, sorted=True).indices


def hard_topk_indicator(scores: Tensor, k: int) -> Tensor:
    """The ``(k, n)`` one-hot indicator of :func:`hard_topk` (rows by descending score)."""
    index = hard_topk(scores, k)
    out = torch.zeros((len(index), scores.shape[-1]), dtype=scores.dtype, device=scores.device)
    out[torch.arange(len(index), device=scores.device), index] = 1
    return out


def _checked_k(scores: Tensor, k: int) -> int:
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor, got shape {tuple(scores.shape)}")
    k = int(k)
    if not 1 <= k <= scores.shape[0]:
        raise ValueError(f"k must be between 1 and the {scores.shape[0]} scores, got {k}")
    return k


class PerturbedTopK(torch.autograd.Function):
    """``Ȳ(s)``: the perturbed top-K indicator (see the module notes), as an autograd function.

    ``PerturbedTopK.apply(scores, k, sigma, samples, generator)`` with ``scores`` ``(n,)``
    returns ``(k, n)``; rows in descending score order. Prefer :func:`perturbed_topk`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        scores: Tensor,
        k: int,
        sigma: float,
        samples: int,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Mean one-hot indicator of the top ``k`` of ``samples`` noisy copies of ``scores``."""
        n = scores.shape[0]
        work = scores.detach().float()
        noise = torch.randn(
            (int(samples), n),
            generator=generator,
            device=generator.device if generator is not None else work.device,
            dtype=torch.float32,
        ).to(work.device)
        # (samples, k): the rank-j patch of each noisy copy, by descending perturbed score
        index = torch.topk(work[None] + float(sigma) * noise, k, dim=-1, sorted=True).indices
        counts = torch.zeros((k, n), dtype=torch.float32, device=work.device)
        counts.scatter_add_(1, index.T, torch.ones(index.T.shape, device=work.device))
        ctx.save_for_backward(index, noise)
        ctx.sigma = float(sigma)
        ctx.input_dtype = scores.dtype
        return (counts / samples).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        """``E[⟨G, Y(s + σZ)⟩ Z] / σ`` over the forward pass's draws."""
        index, noise = ctx.saved_tensors
        grad = grad_output.float()
        k = index.shape[1]
        # ⟨G, Y_i⟩ = Σ_j G[j, index[i, j]] for each noisy copy i
        rows = torch.arange(k, device=grad.device).expand_as(index)
        inner = grad[rows, index].sum(dim=1)
        grad_scores = inner @ noise / (noise.shape[0] * ctx.sigma)
        return grad_scores.to(ctx.input_dtype), None, None, None, None


def perturbed_topk(
    scores: Tensor,
    k: int,
    sigma: float,
    samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Differentiable soft top-K indicator (see the module notes).

    Parameters
    ----------
    scores : Tensor
        ``(n,)`` unnormalised scores.
    k : int
        Patches to select (``1 ≤ k ≤ n``).
    sigma : float
        Standard deviation of the Gaussian noise added to the scores (> 0).
    samples : int
        Noisy copies averaged (≥ 1).
    generator : torch.Generator, optional
        Source of the noise (on any device; the noise moves to the scores' device). The
        global RNG when omitted.

    Returns
    -------
    Tensor
        ``(k, n)``: row ``j`` is the frequency with which each patch ranks ``j``-th (rows in
        descending score order); rows sum to 1, columns to at most 1.
    """
    k = _checked_k(scores, k)
    if not float(sigma) > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if int(samples) < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    return PerturbedTopK.apply(scores, k, float(sigma), int(samples), generator)
