"""Tests for the linearized multi-sampling sampler (napari_magnet.models.sampler)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_magnet.models.sampler import affine_sample, linearized_grid_sample

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _bilinear(image: torch.Tensor, grid: torch.Tensor, align_corners: bool) -> torch.Tensor:
    return F.grid_sample(
        image, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners
    )


def _random_case(seed: int, dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, 17, 23, generator=g, dtype=dtype)
    grid = torch.rand(2, 9, 11, 2, generator=g, dtype=dtype) * 2.2 - 1.1  # some outside
    grad_out = torch.randn(2, 3, 9, 11, generator=g, dtype=dtype)
    return image.to(device), grid.to(device), grad_out.to(device)


def _ramp_case(align_corners: bool, dtype: torch.dtype, device: str = "cpu"):
    """A per-channel linear image and a grid well inside it (aux points stay inside)."""
    g = torch.Generator().manual_seed(3)
    h, w = 48, 64
    a = torch.randn(3, generator=g, dtype=dtype)
    b = torch.randn(3, generator=g, dtype=dtype)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij"
    )
    image = (a[:, None, None] * xs + b[:, None, None] * ys + 0.5)[None].repeat(2, 1, 1, 1)
    theta = torch.tensor(
        [[[0.3, 0.1, 0.05], [-0.1, 0.3, 0.0]], [[0.2, 0.0, -0.1], [0.0, 0.25, 0.1]]], dtype=dtype
    )
    grid = F.affine_grid(theta, [2, 3, 6, 7], align_corners=align_corners)  # |grid| < 0.5
    grad_out = torch.randn(2, 3, 6, 7, generator=g, dtype=dtype)
    sx = (w - 1) / 2 if align_corners else w / 2
    sy = (h - 1) / 2 if align_corners else h / 2
    expected = torch.stack(
        (
            torch.einsum("nchw,c->nhw", grad_out, a) * sx,
            torch.einsum("nchw,c->nhw", grad_out, b) * sy,
        ),
        dim=-1,
    )
    return image.to(device), grid.to(device), grad_out.to(device), expected.to(device)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_bilinear(align_corners: bool, dtype: torch.dtype) -> None:
    image, grid, _ = _random_case(0, dtype)
    expected = _bilinear(image, grid, align_corners)
    with torch.no_grad():
        assert torch.equal(
            linearized_grid_sample(image, grid, align_corners=align_corners), expected
        )
    out = linearized_grid_sample(
        image.requires_grad_(), grid.requires_grad_(), align_corners=align_corners
    )
    assert out.requires_grad
    assert torch.equal(out.detach(), expected)


@pytest.mark.parametrize("align_corners", [False, True])
def test_image_gradient_equals_bilinear(align_corners: bool) -> None:
    image, grid, grad_out = _random_case(1, torch.float64)
    ref_img = image.clone().requires_grad_()
    _bilinear(ref_img, grid, align_corners).backward(grad_out)
    img = image.clone().requires_grad_()
    grd = grid.clone().requires_grad_()
    linearized_grid_sample(img, grd, align_corners=align_corners).backward(grad_out)
    torch.testing.assert_close(img.grad, ref_img.grad, rtol=0, atol=1e-12)
    # The map is linear in the image, so the image gradient is the true derivative.
    assert torch.autograd.gradcheck(
        lambda x: linearized_grid_sample(x, grid[:1], align_corners=align_corners),
        (image[:1, :2, :6, :7].clone().requires_grad_(),),
    )


@pytest.mark.parametrize("align_corners", [False, True])
def test_grid_gradient_exact_on_linear_image(align_corners: bool) -> None:
    """On a ramp the plane fit is exact: checks the pixel <-> grid unit conversion."""
    image, grid, grad_out, expected = _ramp_case(align_corners, torch.float64)
    grid.requires_grad_()
    linearized_grid_sample(image, grid, align_corners=align_corners).backward(grad_out)
    torch.testing.assert_close(grid.grad, expected, rtol=1e-8, atol=1e-8)
    # ... and equals bilinear's own grid gradient there.
    ref = grid.detach().clone().requires_grad_()
    _bilinear(image, ref, align_corners).backward(grad_out)
    torch.testing.assert_close(grid.grad, ref.grad, rtol=1e-8, atol=1e-8)


def test_generator_makes_gradient_reproducible() -> None:
    image, grid, grad_out = _random_case(2, torch.float32)

    def grad(seed: int) -> torch.Tensor:
        grd = grid.clone().requires_grad_()
        linearized_grid_sample(
            image, grd, align_corners=False, generator=torch.Generator().manual_seed(seed)
        ).backward(grad_out)
        return grd.grad

    assert torch.equal(grad(5), grad(5))
    assert not torch.equal(grad(5), grad(6))


def test_degenerate_grids_give_finite_gradients() -> None:
    image = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    cases = [
        torch.zeros(1, 4, 4, 2, dtype=torch.float64),  # every point the same
        torch.full((1, 3, 3, 2), 5.0, dtype=torch.float64),  # far outside: all zeros
        torch.zeros(1, 1, 1, 2, dtype=torch.float64),  # a single output pixel
    ]
    for grid in cases:
        for align_corners in (False, True):
            grd = grid.clone().requires_grad_()
            out = linearized_grid_sample(image, grd, align_corners=align_corners, noise=0.0)
            out.sum().backward()
            assert torch.isfinite(grd.grad).all()
    grd = cases[1].clone().requires_grad_()
    linearized_grid_sample(image, grd, align_corners=False).sum().backward()
    assert torch.equal(grd.grad, torch.zeros_like(grd))
    # align_corners with a 1-pixel-wide image: the output does not depend on x.
    img1 = torch.randn(1, 1, 5, 1, dtype=torch.float64)
    grd = (torch.rand(1, 3, 3, 2, dtype=torch.float64) - 0.5).requires_grad_()
    linearized_grid_sample(img1, grd, align_corners=True).sum().backward()
    assert torch.equal(grd.grad[..., 0], torch.zeros_like(grd.grad[..., 0]))


def test_invalid_arguments() -> None:
    image, grid, _ = _random_case(0, torch.float32)
    with pytest.raises(ValueError):
        linearized_grid_sample(image, grid, align_corners=False, n_aux=1)
    with pytest.raises(ValueError):
        linearized_grid_sample(image[0], grid, align_corners=False)


# --- the point of the method: grid gradients under strong downscaling --------------------


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = img.shape[1]
    img = F.conv2d(
        F.pad(img, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    return F.conv2d(
        F.pad(img, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )


def _pink_noise(g: torch.Generator, size: int) -> torch.Tensor:
    """Random RGB image with a natural-image (1/f amplitude) spectrum, zero mean, unit std."""
    white = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    img = torch.fft.ifft2(torch.fft.fft2(white) / radius).real
    img = img - img.mean()
    return img / img.std()


def _theta_gradients(seed: int, downscale: int, n_aux: int = 7):
    """d(loss)/d(theta) by ours, by bilinear, and by finite differences on the smoothed image.

    8 patches of 32x32 from a 384x384 image, each a ``downscale``x zoom-out at a random
    position (kept >= 19 px from the border); loss = sum(output * fixed random weights).
    """
    size, out, n = 384, 32, 8
    g = torch.Generator().manual_seed(seed)
    base = _pink_noise(g, size)
    image = base.expand(n, -1, -1, -1)
    s = out * downscale / size
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = s
    theta[:, :, 2] = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * (0.9 - s)
    weights = torch.randn(n, 3, out, out, generator=g, dtype=torch.float64)

    def autograd_grad(linearized: bool) -> torch.Tensor:
        th = theta.clone().requires_grad_()
        grid = F.affine_grid(th, [n, 3, out, out], align_corners=False)
        if linearized:
            o = linearized_grid_sample(
                image,
                grid,
                align_corners=False,
                n_aux=n_aux,
                generator=torch.Generator().manual_seed(100 + seed),
            )
        else:
            o = _bilinear(image, grid, False)
        (o * weights).sum().backward()
        return th.grad

    smooth = _blur(base, downscale / 2).expand(n, -1, -1, -1)  # low-passed at output rate
    step = 2 / size  # one source pixel in normalized units
    ref = torch.zeros_like(theta)
    for i in range(2):
        for j in range(3):
            loss = []
            for sign in (1, -1):
                th = theta.clone()
                th[:, i, j] += sign * step
                o = affine_sample(smooth, th, out, align_corners=False, linearized=False)
                loss.append((o * weights).sum(dim=(1, 2, 3)))
            ref[:, i, j] = (loss[0] - loss[1]) / (2 * step)
    return autograd_grad(True), autograd_grad(False), ref


def _errors(est: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    rel = ((est - ref).norm() / ref.norm()).item()
    cos = F.cosine_similarity(est.flatten(), ref.flatten(), dim=0).item()
    return rel, cos


@pytest.mark.parametrize("downscale", [4, 8])
def test_grid_gradient_tracks_smoothed_image_under_downscaling(downscale: int) -> None:
    seeds = range(3)
    figures = []
    for seed in seeds:
        ours, bil, ref = _theta_gradients(seed, downscale)
        figures.append(_errors(ours, ref) + _errors(bil, ref))
    rel_ours, cos_ours, rel_bil, cos_bil = (
        sum(f[k] for f in figures) / len(figures) for k in range(4)
    )
    msg = (
        f"{downscale}x downscale, mean over seeds {list(seeds)}: relative error "
        f"ours {rel_ours:.3f} vs bilinear {rel_bil:.3f}; cosine ours {cos_ours:.3f} vs "
        f"bilinear {cos_bil:.3f}"
    )
    print(msg)
    assert rel_ours < 0.4 * rel_bil, msg
    assert cos_ours > cos_bil + 0.15, msg


def test_grid_gradient_converges_to_smoothed_gradient_with_more_samples() -> None:
    """The fit's error is sampling noise: more auxiliary points bring it towards the reference."""
    rel = {}
    for n_aux in (7, 31):
        ours, _, ref = _theta_gradients(0, 8, n_aux=n_aux)
        rel[n_aux] = _errors(ours, ref)
    msg = f"8x, seed 0, (relative error, cosine) by n_aux: {rel}"
    print(msg)
    assert rel[31][0] < 0.7 * rel[7][0], msg
    assert rel[31][1] > 0.8, msg


# --- affine_sample ----------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_sample_gradient_reaches_theta(align_corners: bool) -> None:
    g = torch.Generator().manual_seed(4)
    image = torch.randn(2, 3, 112, 112, generator=g, dtype=torch.float64).requires_grad_()
    theta = torch.tensor(
        [[[0.5, 0.0, 0.2], [0.0, 0.5, -0.1]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]],
        dtype=torch.float64,
        requires_grad=True,
    )
    out = affine_sample(image, theta, 56, align_corners=align_corners)
    assert out.shape == (2, 3, 56, 56) and out.dtype == torch.float64
    plain = affine_sample(image, theta, 56, align_corners=align_corners, linearized=False)
    assert torch.equal(out, plain)
    (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(theta.grad).all() and (theta.grad.abs() > 0).all()
    assert image.grad is not None and torch.isfinite(image.grad).all()


def test_affine_sample_under_inference_mode() -> None:
    image = torch.randn(1, 3, 40, 40, requires_grad=True)
    theta = torch.tensor([[[0.3, 0.0, 0.1], [0.0, 0.3, 0.2]]], requires_grad=True)
    with torch.inference_mode():
        out = affine_sample(image, theta, 16, align_corners=False)
        grid = F.affine_grid(theta, [1, 3, 16, 16], align_corners=False)
        ref = _bilinear(image, grid, False)
    assert not out.requires_grad
    assert torch.equal(out, ref)


# --- CUDA ------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    image, grid, grad_out = _random_case(7, dtype, "cuda")
    img = image.clone().requires_grad_()
    grd = grid.clone().requires_grad_()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = linearized_grid_sample(img, grd, align_corners=False, generator=gen)
    out.backward(grad_out)
    ref_img = image.cpu().requires_grad_()
    ref = _bilinear(ref_img, grid.cpu(), False)
    ref.backward(grad_out.cpu())
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.cpu(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(img.grad.cpu(), ref_img.grad, rtol=tol, atol=tol)
    assert torch.isfinite(grd.grad).all()
    # A CPU generator drives CUDA tensors too.
    grd2 = grid.clone().requires_grad_()
    linearized_grid_sample(
        image, grd2, align_corners=True, generator=torch.Generator().manual_seed(0)
    ).backward(grad_out)
    assert torch.isfinite(grd2.grad).all()


@CUDA
def test_cuda_grid_gradient_exact_on_linear_image() -> None:
    image, grid, grad_out, expected = _ramp_case(False, torch.float64, "cuda")
    grid.requires_grad_()
    linearized_grid_sample(image, grid, align_corners=False).backward(grad_out)
    torch.testing.assert_close(grid.grad, expected, rtol=1e-8, atol=1e-8)


def test_affine_sample_under_cpu_bf16_autocast_keeps_fp32_geometry():
    """Under autocast the sampler still builds its grid and samples in fp32, with gradients."""
    from napari_magnet.models.sampler import affine_sample

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g)
    theta = torch.tensor([[[0.5, 0.0, 0.1], [0.0, 0.5, -0.2]]] * 2, requires_grad=True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = affine_sample(image.bfloat16(), theta, 16, align_corners=False)
    assert out.dtype == torch.float32
    reference = affine_sample(
        image.bfloat16().float(), theta.detach(), 16, align_corners=False, linearized=False
    )
    torch.testing.assert_close(out.detach(), reference)
    out.sum().backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all()
