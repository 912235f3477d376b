"""MagNet's tensor helpers: the grey filter, normalized grids, θ composition (DESIGN §4)."""

from __future__ import annotations

import torch

__all__ = ["compose_theta", "grey_filter", "identity_theta", "normalized_grid"]

# ----------------------------------------------------------------------------- helpers


def grey_filter(images: torch.Tensor, threshold: float = 15.0) -> torch.Tensor:
    """Blacken pixels whose R, G, B differ pairwise by less than ``threshold`` (0–255 scale).

    "Pairwise less than" is ``max(R, G, B) − min(R, G, B) < threshold``. Float images are in
    ``[0, 1]`` (the threshold is divided by 255, with a 1e-3 grey-level tolerance so that
    images converted from 8 bits keep a difference of exactly ``threshold``); ``uint8`` images
    are compared on 0–255 directly. The mask is not differentiated (kept pixels pass their
    gradient unchanged).

    Parameters
    ----------
    images : torch.Tensor
        ``(…, 3, H, W)``.
    threshold : float
        Threshold on the 0–255 scale.

    Returns
    -------
    torch.Tensor
        Same shape and dtype.
    """
    if images.shape[-3] != 3:
        raise ValueError(f"grey_filter expects (..., 3, H, W), got {tuple(images.shape)}")
    if threshold <= 0:
        return images
    rng = images.amax(dim=-3, keepdim=True) - images.amin(dim=-3, keepdim=True)
    if images.dtype == torch.uint8:
        keep = rng >= threshold
    else:
        keep = rng.float() >= (threshold - 1e-3) / 255.0
    return images * keep.to(images.dtype)


def normalized_grid(
    size: int, align_corners: bool, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Normalized coordinates of the ``size`` pixel centres along an axis.

    ``align_corners=False``: ``(2i + 1)/size − 1``; ``True``: ``linspace(−1, 1, size)``.
    """
    if align_corners:
        return torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype)
    return (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1


def identity_theta(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n, 2, 3)`` identity affine maps."""
    # Built on the device (no host-to-device copy), so CUDA graphs can capture it.
    theta = torch.zeros(n, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    return theta


def compose_theta(parent_chain: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Compose each input's chain with its patches' θ: ``chain ∘ θ``.

    Parameters
    ----------
    parent_chain : torch.Tensor
        ``(N, 2, 3)``: row ``n`` maps input ``n``'s normalized frame to layer 1's frame
        (identity for layer 1's input).
    theta : torch.Tensor
        ``(N, P, 2, 3)``: θ of input ``n``'s patch ``p`` (patch frame → input frame).

    Returns
    -------
    torch.Tensor
        ``(N·P, 2, 3)`` in lineage order (row ``n·P + p``): patch frame → layer 1's frame,
        ``M = [A_c A_θ | A_c t_θ + t_c]``.
    """
    if parent_chain.dim() != 3 or parent_chain.shape[1:] != (2, 3):
        raise ValueError(f"parent_chain must be (N, 2, 3), got {tuple(parent_chain.shape)}")
    if theta.dim() != 4 or theta.shape[2:] != (2, 3) or theta.shape[0] != parent_chain.shape[0]:
        raise ValueError(
            f"theta must be (N, P, 2, 3) with N={parent_chain.shape[0]}, got {tuple(theta.shape)}"
        )
    n, p = theta.shape[:2]
    dtype = torch.promote_types(parent_chain.dtype, theta.dtype)
    a_c = parent_chain[:, None, :, :2].to(dtype)  # (N, 1, 2, 2)
    t_c = parent_chain[:, None, :, 2:].to(dtype)  # (N, 1, 2, 1)
    a_t = theta[..., :2].to(dtype)
    t_t = theta[..., 2:].to(dtype)
    out = torch.cat([a_c @ a_t, a_c @ t_t + t_c], dim=-1)
    return out.reshape(n * p, 2, 3)


def _st_clamp_min(x: torch.Tensor, lo: float) -> torch.Tensor:
    """``max(x, lo)`` in value, identity in gradient (straight-through lower clamp).

    A hard clamp would give a scale that collapsed below ``lo`` no gradient at all; this keeps
    the signal that asks the map to spread out again.
    """
    return x + (x.clamp_min(lo) - x).detach()
