"""Linearized multi-sampling: a bilinear sampler whose grid gradients survive downscaling.

MagNet's magnifying layers crop and zoom with a spatial transformer, ``θ = [[s, 0, t_x],
[0, s, t_y]]``, and learn θ from the gradient of the loss with respect to the sampling grid.
With plain bilinear sampling (``F.grid_sample``) that gradient is the slope of the 2×2 source
pixels around each sampling point. Under strong downscaling (a 112-pixel ``I'`` squeezed
into a 56-pixel output, or a whole slide into one patch) the output samples one point every
few source pixels, and the local slopes are dominated by texture far finer than the output can
represent: the grid gradient is mostly noise and θ learns poorly.

Linearized multi-sampling (Jiang, Sun, Tagliasacchi, Yi & Tsai, "Linearized Multi-Sampling for
Differentiable Image Transformation", ICCV 2019) keeps bilinear's *forward value* but replaces
its *grid gradient*: around each sampling point it draws auxiliary points (Gaussian jitter of
about half an output pixel, pushed at least ~one source pixel away from the centre), samples the
image there, and fits a plane ``v ≈ a + J·(p − p0)`` by least squares. The fitted slope ``J``
summarises the image over the area one output pixel stands for, so it approximates the gradient
of the image low-passed at the output's sampling rate, which is what moving the crop should
follow. The image gradient is bilinear's (centre sample only).

This is our own implementation: the noise is drawn per output pixel along the grid's local
axes (so it follows rotation and anisotropic scale), the fit is in source-pixel units over the
centre and the auxiliary points with a fitted intercept (so the centre's own fine-scale value
does not tilt the plane; with the intercept pinned to the centre value the 8x-downscale gradient
was visibly noisier in our tests), the 2×2 normal equations are solved in closed form with a
tiny ridge, and the channels are contracted with the incoming gradient before the fit
(``Σ_c g_c A⁻¹ b_c = A⁻¹ Σ_c g_c b_c``), so the backward pass holds no per-channel slopes.
The jitter is drawn in the backward pass; forward-only use (inference) costs one bilinear
sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["affine_sample", "linearized_grid_sample"]


def _pixel_scale(size: int, align_corners: bool) -> float:
    """Source pixels per normalized grid unit along an axis of ``size`` pixels."""
    return (size - 1) / 2.0 if align_corners else size / 2.0


def _grid_axis_step(g: torch.Tensor, dim: int) -> torch.Tensor:
    """Central difference of ``g`` along ``dim`` (one-sided at the ends, zero if size 1)."""
    n = g.shape[dim]
    if n < 2:
        return torch.zeros_like(g)
    return torch.gradient(g, dim=dim)[0]


def _grid_gradient(
    image: torch.Tensor,
    grid: torch.Tensor,
    grad_out: torch.Tensor,
    align_corners: bool,
    n_aux: int,
    noise: float,
    push: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Grid gradient from the per-pixel least-squares plane fit (see the module docstring)."""
    h, w = image.shape[-2:]
    work = torch.promote_types(grid.dtype, torch.float32)
    # Normalized -> source-pixel scale per axis (x, y); a zero scale (align_corners, size 1)
    # means the output does not depend on that coordinate: its gradient is zero.
    scale = torch.tensor(
        [_pixel_scale(w, align_corners), _pixel_scale(h, align_corners)],
        dtype=work,
        device=grid.device,
    )
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Local axes of the output grid in source pixels: the footprint of one output pixel.
    grid_px = grid.to(work) * scale
    ex = _grid_axis_step(grid_px, dim=2)  # per output column, (N, Ho, Wo, 2)
    ey = _grid_axis_step(grid_px, dim=1)  # per output row

    def contract(g: torch.Tensor) -> torch.Tensor:  # Σ_c grad_out_c · sample_c -> (N, Ho, Wo)
        v = F.grid_sample(
            image, g, mode="bilinear", padding_mode="zeros", align_corners=align_corners
        )
        return (grad_out * v).sum(dim=1).to(work)

    # Least squares over the centre (offset 0) and the auxiliary points with a fitted
    # intercept: accumulate the sums of the centred normal equations. Values are taken
    # relative to the centre's (the fit is shift invariant) to avoid cancellation.
    s0 = contract(grid)
    sum_d = torch.zeros_like(grid_px)
    sum_s = torch.zeros_like(s0)
    sum_ds = torch.zeros_like(grid_px)
    a_xx = torch.zeros_like(s0)
    a_xy = torch.zeros_like(s0)
    a_yy = torch.zeros_like(s0)
    gen_device = generator.device if generator is not None else grid.device
    for _ in range(n_aux):
        z = torch.randn(grid.shape, generator=generator, device=gen_device, dtype=work)
        z = z.to(grid.device)
        d = noise * (ex * z[..., :1] + ey * z[..., 1:])  # source pixels
        # Push away from the centre, per axis, so that the points span >= `push` pixels
        # even where the grid is degenerate (then the jitter's own sign is used).
        d = d + push * torch.where(d != 0, d.sign(), z.sign())
        ds = contract((grid.to(work) + d / safe_scale).to(grid.dtype)) - s0
        sum_d += d
        sum_s += ds
        sum_ds += d * ds.unsqueeze(-1)
        a_xx += d[..., 0] * d[..., 0]
        a_xy += d[..., 0] * d[..., 1]
        a_yy += d[..., 1] * d[..., 1]
    m = n_aux + 1
    mean_d = sum_d / m
    b = sum_ds - mean_d * sum_s.unsqueeze(-1)
    a_xx = a_xx - m * mean_d[..., 0] * mean_d[..., 0]
    a_xy = a_xy - m * mean_d[..., 0] * mean_d[..., 1]
    a_yy = a_yy - m * mean_d[..., 1] * mean_d[..., 1]
    # Closed-form 2x2 solve. The tiny ridge (a few ulps of the trace, plus eps for an empty
    # fit) keeps the determinant positive despite rounding; it biases J by ~1e-6 in float32.
    eps = torch.finfo(work).eps
    ridge = 8 * eps * (a_xx + a_yy) + eps
    a_xx, a_yy = a_xx + ridge, a_yy + ridge
    det = a_xx * a_yy - a_xy * a_xy
    jx = (a_yy * b[..., 0] - a_xy * b[..., 1]) / det
    jy = (a_xx * b[..., 1] - a_xy * b[..., 0]) / det
    # d(value)/d(pixel) -> d(value)/d(normalized grid): multiply by pixels per grid unit.
    return (torch.stack((jx, jy), dim=-1) * scale).to(grid.dtype)


class _LinearizedGridSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, grid, align_corners, n_aux, noise, push, generator):  # noqa: D102
        ctx.save_for_backward(image, grid)
        ctx.opts = (align_corners, n_aux, noise, push, generator)
        return F.grid_sample(
            image, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        image, grid = ctx.saved_tensors
        align_corners, n_aux, noise, push, generator = ctx.opts
        grad_image = grad_grid = None
        if ctx.needs_input_grad[0]:
            # Bilinear's own image gradient (centre sample only).
            grad_image, _ = torch.ops.aten.grid_sampler_2d_backward(
                grad_out, image, grid, 0, 0, align_corners, [True, False]
            )
        if ctx.needs_input_grad[1]:
            grad_grid = _grid_gradient(
                image, grid, grad_out, align_corners, n_aux, noise, push, generator
            )
        return grad_image, grad_grid, None, None, None, None, None


def linearized_grid_sample(
    image: torch.Tensor,
    grid: torch.Tensor,
    *,
    align_corners: bool,
    n_aux: int = 7,
    noise: float = 0.5,
    push: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bilinear ``grid_sample`` with linearized multi-sampling grid gradients.

    Parameters
    ----------
    image : torch.Tensor
        ``(N, C, H, W)`` source images.
    grid : torch.Tensor
        ``(N, Ho, Wo, 2)`` sampling points, normalized ``(x, y)`` in ``[-1, 1]`` as for
        :func:`torch.nn.functional.grid_sample`; same dtype and device as ``image``.
    align_corners : bool
        Meaning of ``±1`` (pixel centres of the corner pixels if True, their outer edges if
        False), exactly as in ``grid_sample``. Always pass it explicitly.
    n_aux : int
        Auxiliary samples per output pixel for the plane fit (at least 2; 7 in the paper).
    noise : float
        Standard deviation of the auxiliary jitter, in output-pixel spacings (the local grid
        step, measured along the grid's own axes).
    push : float
        Extra displacement, in source pixels, added to each jitter coordinate away from the
        centre, so that the auxiliary points span about a source pixel even when the output
        is barely downscaled or the grid is degenerate.
    generator : torch.Generator, optional
        Source of the jitter (drawn in the backward pass), for reproducible gradients.

    Returns
    -------
    torch.Tensor
        ``(N, C, Ho, Wo)``, equal to ``grid_sample(image, grid, mode="bilinear",
        padding_mode="zeros", align_corners=align_corners)``. Its image gradient is
        bilinear's; its grid gradient is ``Σ_c grad_out_c · J_c`` with ``J_c`` the
        least-squares slope of channel ``c`` over the centre and auxiliary samples.
    """
    if n_aux < 2:
        raise ValueError(f"n_aux must be at least 2 to fit a plane, got {n_aux}")
    if image.dim() != 4 or grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(
            f"expected image (N,C,H,W) and grid (N,Ho,Wo,2), got "
            f"{tuple(image.shape)} and {tuple(grid.shape)}"
        )
    if not torch.is_grad_enabled() or not (image.requires_grad or grid.requires_grad):
        return F.grid_sample(
            image, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
        )
    return _LinearizedGridSample.apply(
        image, grid, align_corners, n_aux, float(noise), float(push), generator
    )


def affine_sample(
    image: torch.Tensor,
    theta: torch.Tensor,
    out_size: int,
    *,
    align_corners: bool,
    linearized: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample a square ``out_size``² view of ``image`` through the affine map ``theta``.

    Parameters
    ----------
    image : torch.Tensor
        ``(N, C, H, W)`` source images.
    theta : torch.Tensor
        ``(N, 2, 3)`` affine matrices from output to input normalized coordinates, as for
        :func:`torch.nn.functional.affine_grid` (MagNet: ``[[s, 0, t_x], [0, s, t_y]]``).
    out_size : int
        Side of the square output.
    align_corners : bool
        Passed to both ``affine_grid`` and the sampler.
    linearized : bool
        Linearized multi-sampling (default) or plain bilinear ``grid_sample``.
    generator : torch.Generator, optional
        Jitter source for the linearized grid gradient.

    Returns
    -------
    torch.Tensor
        ``(N, C, out_size, out_size)``, differentiable with respect to ``image`` and ``theta``.
    """
    n, c = image.shape[:2]
    # Half-precision grids are pixels off on a 448 px source, and a bf16 grid saved for the
    # backward breaks grid_sample's kernels: sample in (at least) fp32 with autocast off.
    work = torch.float32 if image.dtype in (torch.float16, torch.bfloat16) else image.dtype
    with torch.autocast(device_type=image.device.type, enabled=False):
        image = image.to(work)
        grid = F.affine_grid(
            theta.to(work), [n, c, out_size, out_size], align_corners=align_corners
        )
        if linearized:
            return linearized_grid_sample(
                image, grid, align_corners=align_corners, generator=generator
            )
        return F.grid_sample(
            image, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
        )
