"""Attention sampling's building blocks: the attention and feature networks, the forward's
output record and the sampling helpers (DESIGN §5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATSOutput", "AttentionNet", "FeatureNet", "gumbel_top_k"]


class AttentionNet(nn.Module):
    """Three blocks conv 3×3 (8) + BatchNorm + ReLU, then conv 3×3 → 1 channel of scores."""

    def __init__(self, channels: int = 8, blocks: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for _ in range(blocks):
            layers += [
                nn.Conv2d(c_in, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            c_in = channels
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, view: Tensor) -> Tensor:
        """``(B, 3, h, w)`` → unnormalised scores ``(B, h, w)``."""
        return self.net(view).squeeze(1)


class FeatureNet(nn.Module):
    """Four conv 3×3 (16) + ReLU, global max pool, linear, L2 normalisation."""

    def __init__(self, feature_dim: int, channels: int = 16, blocks: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for _ in range(blocks):
            layers += [nn.Conv2d(c_in, channels, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = channels
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(channels, feature_dim)

    def forward(self, patches: Tensor) -> Tensor:
        """``(M, 3, P, P)`` → unit-norm features ``(M, feature_dim)``."""
        h = self.convs(patches).amax(dim=(2, 3))
        return F.normalize(self.proj(h), dim=1)


@dataclass
class ATSOutput:
    """What :meth:`AttentionSampling.forward` returns (tensors, batch first).

    Attributes
    ----------
    logits : Tensor
        ``(B, n_classes)``, computed from the surrogate features (value = the estimate).
    probabilities : Tensor
        ``(B, n_classes)`` softmax of ``logits``.
    attention : Tensor
        ``(B, h', w')`` attention distribution (masked by the forward's ``visible``, if any).
    indices : Tensor
        ``(B, n)`` flat sampled positions, in sampling order.
    sampled_attention : Tensor
        ``(B, n)`` attention probability of each sampled position.
    draw_log_probs : Tensor
        ``(B, n)`` log-probability of each draw given the earlier ones (sum = ``log P(s)``).
    centres : Tensor
        ``(B, n, 2)`` patch centres, view-normalised ``(x, y)``.
    features : Tensor
        ``(B, feature_dim)`` surrogate of the attention-weighted mean feature.
    patches : Tensor
        ``(B * n, 3, P, P)`` the patches the feature network saw (two-level:
        ``(B * N1 * N2, 3, P, P)``, region-major).
    region_attention, region_indices, region_sampled_attention, region_centres : Tensor or None
        Two-level only: ``(B * N1, R', R')`` attention inside each region, ``(B * N1, N2)``
        positions drawn there (sampling order), their attention, and their centres as
        region-normalised ``(x, y)`` ``(B * N1, N2, 2)``. ``draw_log_probs`` then holds the
        regions' draws followed by every region's patch draws, ``(B, N1 + N1 * N2)``.
    """

    logits: Tensor
    probabilities: Tensor
    attention: Tensor
    indices: Tensor
    sampled_attention: Tensor
    draw_log_probs: Tensor
    centres: Tensor
    features: Tensor
    patches: Tensor
    region_attention: Tensor | None = None
    region_indices: Tensor | None = None
    region_sampled_attention: Tensor | None = None
    region_centres: Tensor | None = None


def gumbel_top_k(probabilities: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Sample ``n`` positions without replacement, **in sampling order**.

    Perturbing ``log a`` with i.i.d. Gumbel noise and taking the top ``n`` keys, largest first,
    is distributed exactly like drawing ``n`` times sequentially from ``a`` without replacement
    (renormalising after each draw): the argmax is the first draw, the next-largest the second,
    and so on. The order is part of the sample; it is never sorted by position.

    Parameters
    ----------
    probabilities : Tensor
        ``(B, K)`` distributions.
    n : int
        Draws per row, at most ``K``.
    generator : torch.Generator, optional
        Source of the Gumbel noise (on the probabilities' device).

    Returns
    -------
    Tensor
        ``(B, n)`` int64 positions, first drawn first.
    """
    if n > probabilities.shape[1]:
        raise ValueError(
            f"cannot draw {n} positions without replacement from {probabilities.shape[1]}"
        )
    dtype = probabilities.dtype if probabilities.dtype == torch.float64 else torch.float32
    u = torch.rand(
        probabilities.shape, generator=generator, device=probabilities.device, dtype=dtype
    )
    tiny = torch.finfo(dtype).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(dtype).eps)
    keys = probabilities.to(dtype).log() - torch.log(-torch.log(u))
    return torch.topk(keys, n, dim=1, largest=True, sorted=True).indices


def _restricted(
    attention: Tensor, visible: Callable[[Tensor, int], Tensor] | None, level: int
) -> Tensor:
    """``attention`` times ``visible(attention, level)``, each map renormalised.

    A map whose mask is zero everywhere (it shows nothing of the slide) is only renormalised.
    """
    if visible is None:
        return attention
    mask = visible(attention, level).to(device=attention.device, dtype=attention.dtype)
    if tuple(mask.shape) != tuple(attention.shape):
        raise ValueError(
            f"visible returned a {tuple(mask.shape)} mask for attention {tuple(attention.shape)}"
        )
    shows = (mask.flatten(1) != 0).any(dim=1)
    if not bool(shows.all()):
        mask = torch.where(
            shows.reshape((-1,) + (1,) * (mask.dim() - 1)), mask, torch.ones_like(mask)
        )
    masked = attention * mask
    return masked / masked.sum(dim=(-2, -1), keepdim=True)


def _check_draws(attention: Tensor, n: int, replace: bool, what: str) -> None:
    """Raise if a draw of ``n`` without replacement needs more than a map's non-zero positions."""
    positions = int((attention > 0).flatten(1).sum(dim=1).min())
    if not replace and n > positions:
        raise ValueError(f"cannot draw {n} distinct {what} from {positions} positions")


def _checked(images: Tensor, expected: tuple[int, ...], what: str, view: Tensor) -> Tensor:
    """Check a reader callback's output shape; return it on the view's device and dtype."""
    if tuple(images.shape) != expected:
        raise ValueError(f"{what} returned {tuple(images.shape)}, expected {expected}")
    return images.to(device=view.device, dtype=view.dtype)
