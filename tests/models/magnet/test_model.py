"""MagNet (DESIGN §4): config, branch stacks, θ, lineage, gradients, grey filter, augmentation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from napari_magnet.models.magnet import (
    MAGNET_CONFIGS,
    Dihedral,
    LayerOutput,
    MagNet,
    MagNetConfig,
    MagNetOutput,
    StackBank,
    augment,
    compose_theta,
    grey_filter,
    identity_theta,
    normalized_grid,
)

LITE = MAGNET_CONFIGS["magnet3-lite"]


def build(config: MagNetConfig, seed: int = 0) -> MagNet:
    torch.manual_seed(seed)
    return MagNet(config)


@pytest.fixture(scope="module")
def lite() -> MagNet:
    return build(LITE)


def sampling_reader(model: MagNet, slides: torch.Tensor):
    """read_hi that samples a fixed (B, 3, H, W) tensor through the θ chains (real sampling).

    Layer 1's frame is the whole of ``slides``; a chain row maps the next input's frame into it.
    """
    b = slides.shape[0]
    calls = []

    def read_hi(layer: int, chain: torch.Tensor) -> torch.Tensor:
        calls.append((layer, chain.clone()))
        n = chain.shape[0] // b
        size = model.hi_size(layer)
        src = slides.repeat_interleave(n, dim=0)
        grid = F.affine_grid(chain, [chain.shape[0], 3, size, size], align_corners=False)
        return F.grid_sample(src, grid, mode="bilinear", align_corners=False)

    return read_hi, calls


def layer1_views(model: MagNet, slides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = F.interpolate(
        slides, size=model.config.input_size, mode="bilinear", antialias=True, align_corners=False
    )
    hi = F.interpolate(
        slides, size=model.hi_size(1), mode="bilinear", antialias=True, align_corners=False
    )
    return lo.clamp(0, 1), hi.clamp(0, 1)


def coloured_slides(b: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """Random colourful images (no grey pixels, so the grey filter keeps everything)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x[:, 2] = 0.2 * x[:, 2]
    x[:, 0] = 0.5 + 0.5 * x[:, 0]
    return x


# ----------------------------------------------------------------------------- config


def test_config_roundtrip_and_stable_hash():
    for cfg in MAGNET_CONFIGS.values():
        d = cfg.to_dict()
        again = MagNetConfig.from_dict(d)
        assert again == cfg and again.config_hash() == cfg.config_hash()
        assert len(cfg.config_hash()) == 64
        assert isinstance(d["patches_per_layer"], list)
    # Canonicalisation: ints vs floats and lists vs tuples do not change the hash.
    d = LITE.to_dict()
    d["grey_threshold"] = 15
    d["patches_per_layer"] = [3, 2, 3]
    assert MagNetConfig.from_dict(d).config_hash() == LITE.config_hash()
    assert dataclasses.replace(LITE, grey_threshold=16).config_hash() != LITE.config_hash()
    with pytest.raises(ValueError, match="unknown MagNetConfig keys"):
        MagNetConfig.from_dict({**LITE.to_dict(), "bogus": 1})
    with pytest.raises(ValueError):
        MagNetConfig(patches_per_layer=(3, 2))  # aux layer 3 does not exist
    with pytest.raises(ValueError):
        MagNetConfig(min_scale=0.5)  # cannot hold together with s <= 1 - max|t|


def test_named_configs():
    m3, m4, lite = (MAGNET_CONFIGS[k] for k in ("magnet3", "magnet4", "magnet3-lite"))
    assert m3.patches_per_layer == (3, 2, 3) and m4.patches_per_layer == (3, 2, 3, 2)
    assert m3.classifier_backbone == m4.classifier_backbone == "inception_v3"
    assert m3.aux_backbone == m4.aux_backbone == "resnet18"
    assert lite.patches_per_layer == (3, 2, 3)
    assert lite.classifier_backbone == lite.aux_backbone == "small"
    assert m3.inputs_per_layer == (1, 3, 6) and m4.inputs_per_layer == (1, 3, 6, 18)
    assert m3.learned_patches(2) == (1,) and m3.learned_patches(1) == (0, 1, 2)


def test_lite_is_small(lite):
    n = sum(p.numel() for p in lite.parameters())
    assert n < 400_000
    # stacks: layer 1: 1 input × 3 patches; layer 2: 3 × (2 − frozen 1); layer 3: 6 × 3.
    assert [s.groups for s in lite.stacks] == [3, 3, 18]


@pytest.mark.slow
def test_magnet3_structure_and_forward_batch1():
    model = build(MAGNET_CONFIGS["magnet3"]).eval()
    assert type(model.classifier.trunk).__name__ == "Inception3"
    assert model.classifier.out_features == 2048
    assert model.classifier.trunk.AuxLogits is None
    assert set(model.aux) == {"layer1", "layer3"}
    assert all(type(h.backbone.trunk).__name__ == "ResNet" for h in model.aux.values())
    assert all(h.fc.out_features == 1 for h in model.aux.values())
    assert model.gru.input_size == 2048
    assert [m.out_features for m in model.head if isinstance(m, torch.nn.Linear)] == [512, 256, 1]
    assert [s.groups for s in model.stacks] == [3, 3, 18]
    assert model.pixels_processed() == (10 * 56**2 + 18 * 224**2) * 3
    slides = coloured_slides(1, 512)
    read_hi, calls = sampling_reader(model, slides)
    with torch.no_grad():
        out = model(*layer1_views(model, slides), read_hi)
    assert out.logit.shape == (1,) and torch.isfinite(out.logit).all()
    assert out.layers[-1].patches.shape == (18, 3, 224, 224)
    assert [c[1].shape[0] for c in calls] == [3, 6]
    assert [model.hi_size(layer) for layer, _ in calls] == [112, 448]
    assert set(out.aux_logits) == {1, 3} and out.aux_logits[3].shape == (1,)


def test_pixels_processed_magnet4():
    model = build(MAGNET_CONFIGS["magnet4"])
    assert model.pixels_processed() == (28 * 56**2 + 36 * 224**2) * 3 == 5_682_432
    assert [s.groups for s in model.stacks] == [3, 3, 18, 36]
    assert [model.out_size(layer) for layer in (1, 2, 3, 4)] == [56, 56, 56, 224]
    assert [model.hi_size(layer) for layer in (1, 2, 3, 4)] == [112, 112, 112, 448]


# ----------------------------------------------------------------------------- stacks


def test_grouped_stacks_are_independent_per_group():
    """Group g's output depends only on group g's input and parameters (no cross-talk)."""
    torch.manual_seed(1)
    bank = StackBank(4).eval()
    x = torch.rand(2, 4 * 3, 56, 56)
    y = bank(x)
    assert y.shape == (2, 4, 56, 56)
    x2 = x.clone()
    x2[:, 3:6] = torch.rand(2, 3, 56, 56)  # change group 1's input only
    y2 = bank(x2)
    assert torch.equal(y[:, [0, 2, 3]], y2[:, [0, 2, 3]])
    assert not torch.allclose(y[:, 1], y2[:, 1])


def test_branch_widths():
    bank = StackBank(1)
    b1, b2, b3 = bank.branches
    assert (b1.f, b1.w, b1.out_channels) == (3, 2, 15)
    assert (b2.f, b2.w, b2.out_channels) == (8, 6, 40)
    assert (b3.f, b3.w, b3.out_channels) == (1, 1, 5)
    assert not any(m.bias is not None for m in bank.modules() if isinstance(m, torch.nn.Conv2d))


# ----------------------------------------------------------------------------- θ


def test_theta_from_crafted_maps(lite):
    S = 56
    logits = torch.zeros(5, S, S)
    logits[1, 10, 40] = 50.0  # point mass
    logits[2, 0, 0] = 50.0  # point mass in the corner
    logits[3, :, :28] = 5.0  # left half
    logits[4] = torch.randn(S, S) * 3
    p, theta = lite.theta_from_maps(logits)
    assert torch.allclose(p.sum((-1, -2)), torch.ones(5), atol=1e-5)
    # uniform map → the whole input: identity
    assert torch.allclose(theta[0], identity_theta(1)[0], atol=1e-5)
    g = normalized_grid(S, False)
    # point mass → centre at tanh of its coordinates, scale at its lower bound
    assert torch.allclose(theta[1, 0, 2], torch.tanh(g[40]), atol=1e-5)
    assert torch.allclose(theta[1, 1, 2], torch.tanh(g[10]), atol=1e-5)
    assert theta[1, 0, 0].item() == pytest.approx(0.05)
    assert theta[2, 0, 0].item() == pytest.approx(0.05)
    # left half: centre x at tanh(-0.5), y at 0; s = E|x-cx| + E|y-cy| = 0.25 + 0.5, but
    # clamped to stay inside: 1 - tanh(0.5)
    assert theta[3, 0, 2].item() == pytest.approx(float(torch.tanh(torch.tensor(-0.5))), abs=1e-4)
    assert theta[3, 0, 0].item() == pytest.approx(
        min(0.75, 1 - float(torch.tanh(torch.tensor(0.5)))), abs=1e-4
    )
    assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()
    assert torch.equal(theta[:, 0, 0], theta[:, 1, 1])


def test_theta_constraints_and_frozen_patch(lite):
    slides = coloured_slides(3, 256, seed=3)
    read_hi, _ = sampling_reader(lite, slides)
    lite.train()
    with torch.no_grad():
        out = lite(*layer1_views(lite, slides), read_hi)
    for layer, lo in enumerate(out.layers, start=1):
        s = lo.theta[..., 0, 0]
        t = lo.theta[..., :, 2]
        assert (s >= 0.05 - 1e-6).all() and (s <= 1 + 1e-6).all()
        assert (s + t.abs().amax(-1) <= 1 + 1e-5).all()  # patch inside its input
        assert torch.equal(lo.theta[..., 0, 0], lo.theta[..., 1, 1])
        assert (lo.theta[..., 0, 1] == 0).all() and (lo.theta[..., 1, 0] == 0).all()
        assert torch.allclose(lo.maps.sum((-1, -2)), torch.ones_like(s), atol=1e-5)
        if layer == 2:
            assert torch.equal(lo.theta[:, 0], identity_theta(lo.theta.shape[0]))
            assert torch.allclose(lo.maps[:, 0], torch.full((56, 56), 1 / 56**2))
        else:
            assert not torch.equal(lo.theta[:, 0], identity_theta(lo.theta.shape[0]))


def test_compose_theta_matches_homogeneous_products():
    g = torch.Generator().manual_seed(0)
    chain = torch.randn(4, 2, 3, generator=g)
    theta = torch.randn(4, 3, 2, 3, generator=g)
    out = compose_theta(chain, theta)
    assert out.shape == (12, 2, 3)

    def h(m):
        return torch.cat([m, torch.tensor([[0.0, 0.0, 1.0]])], 0)

    for n in range(4):
        for p in range(3):
            ref = (h(chain[n]) @ h(theta[n, p]))[:2]
            assert torch.allclose(out[n * 3 + p], ref, atol=1e-6)


# ----------------------------------------------------------------------------- lineage, shapes


def ramp_reader(model: MagNet, calls: list):
    """read_hi returning the exact analytic image R = (X+1)/4, G = (Y+1)/4, B = 1 of the
    layer-1 coordinates (X, Y) of every pixel centre: a patch's pixels then spell out where
    it lies in layer 1's frame."""

    def render(chain: torch.Tensor, size: int) -> torch.Tensor:
        grid = F.affine_grid(chain, [chain.shape[0], 3, size, size], align_corners=False)
        rg = (grid + 1) / 4  # (N, H, W, 2)
        rg = rg.permute(0, 3, 1, 2)
        return torch.cat([rg, torch.ones_like(rg[:, :1])], 1)

    def read_hi(layer: int, chain: torch.Tensor) -> torch.Tensor:
        calls.append((layer, chain.clone()))
        return render(chain, model.hi_size(layer))

    return read_hi, render


def test_shapes_lineage_and_theta_chains(lite):
    """Per-layer shapes; patches in input-major lineage order; θ chains map each patch into
    layer 1's frame — checked on pixel values that encode layer-1 coordinates."""
    B = 2
    calls: list = []
    read_hi, render = ramp_reader(lite, calls)
    eye = identity_theta(B)
    lo1, hi1 = render(eye, 56), render(eye, 112)
    # make the two slides differ so batch order matters
    lo1 = lo1 * torch.tensor([1.0, 0.9]).view(2, 1, 1, 1)
    hi1 = hi1 * torch.tensor([1.0, 0.9]).view(2, 1, 1, 1)
    lite.eval()
    with torch.no_grad():
        out = lite(lo1, hi1, read_hi)
    N, P = lite.inputs_per_layer, lite.config.patches_per_layer
    for layer, lo in enumerate(out.layers, start=1):
        n, p, size = N[layer - 1], P[layer - 1], lite.out_size(layer)
        assert lo.theta.shape == (B * n, p, 2, 3)
        assert lo.maps.shape == (B * n, p, 56, 56)
        assert lo.patches.shape == (B * n * p, 3, size, size)
        assert out.theta_chains[layer - 1].shape == (B * n * p, 2, 3)
    assert [(layer, c.shape[0]) for layer, c in calls] == [(2, 6), (3, 12)]
    assert torch.equal(calls[0][1], out.theta_chains[0])
    assert torch.equal(calls[1][1], out.theta_chains[1])
    # chains are compositions along the lineage: row (b·N+n)·P+p = chain[b·N+n] ∘ θ[b·N+n, p]
    prev = identity_theta(B)
    for layer, lo in enumerate(out.layers, start=1):
        chain = out.theta_chains[layer - 1]
        for r in range(chain.shape[0]):
            parent, p = divmod(r, P[layer - 1])
            ref = compose_theta(
                prev[parent : parent + 1], lo.theta[parent : parent + 1, p : p + 1]
            )[0]
            assert torch.allclose(chain[r], ref, atol=1e-6)
        prev = chain
    # pixel values: patch r of layer l shows layer-1 coordinates chain_r(u) (slide 1 scaled by
    # 0.9 in layer 1 only, whose I' is the caller's)
    for layer, lo in enumerate(out.layers, start=1):
        size, hs = lite.out_size(layer), lite.hi_size(layer)
        chain = out.theta_chains[layer - 1]
        expect = render(chain, size)[:, :2]
        if layer == 1:
            expect = expect * torch.tensor([1.0] * 3 + [0.9] * 3).view(-1, 1, 1, 1)
        # compare where the sampling point lies inside the source's pixel-centre range
        local = F.affine_grid(
            lo.theta.reshape(-1, 2, 3), [chain.shape[0], 3, size, size], align_corners=False
        )
        inside = (local.abs() <= 1 - 1 / hs).all(-1)
        got = lo.patches[:, :2]
        diff = (got - expect).abs().amax(1)[inside]
        assert inside.float().mean() > 0.5
        assert diff.max() < 1e-4, (layer, diff.max())


def test_magnify_layer_rejects_bad_shapes(lite):
    with pytest.raises(ValueError, match="lo must be"):
        lite.magnify_layer(2, torch.zeros(4, 3, 56, 56), torch.zeros(4, 3, 112, 112))
    with pytest.raises(ValueError, match="hi must be"):
        lite.magnify_layer(1, torch.zeros(1, 3, 56, 56), torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError, match="layer must be"):
        lite.out_size(4)


# ----------------------------------------------------------------------------- gradients


def test_gradient_reaches_every_stack_and_theta():
    """The classification loss alone reaches every branch stack's parameters (per group) and
    every learned θ, through the linearized sampler and the layer chain."""
    model = build(LITE, seed=0).train()
    torch.manual_seed(0)
    B = 1  # batch 1 also exercises train-mode BatchNorm on a single slide
    slides = coloured_slides(B, 256, seed=1)
    read_hi, _ = sampling_reader(model, slides)
    out = model(*layer1_views(model, slides), read_hi)
    for lo in out.layers:
        lo.theta.retain_grad()
    labels = torch.tensor([1.0])
    F.binary_cross_entropy_with_logits(out.logit, labels).backward(retain_graph=True)
    for layer, (bank, lo) in enumerate(zip(model.stacks, out.layers), start=1):
        G = bank.groups
        per_stack = torch.zeros(G)
        for name, prm in bank.named_parameters():
            assert prm.grad is not None and prm.grad.abs().sum() > 0, (layer, name)
            per_stack += prm.grad.reshape(G, -1).abs().sum(1)  # group g = stack g
        # (single channels of a stack may be dead ReLUs at init; every stack must learn)
        assert (per_stack > 0).all(), (layer, per_stack)
        learned = list(model.config.learned_patches(layer))
        g = lo.theta.grad[:, learned]  # (B·N, K, 2, 3)
        assert torch.isfinite(g).all()
        assert (g[..., 0, 0].abs() + g[..., 1, 1].abs() > 0).all(), layer  # every s
        assert (g[..., :, 2].abs().sum(-1) > 0).all(), layer  # every t
    # the auxiliary heads got nothing from the classification loss, the classifier did
    assert all(p.grad is None for p in model.aux.parameters())
    assert all(p.grad is not None for p in model.classifier.parameters())
    # the full loss: parts add up and reach the auxiliary heads too
    model.zero_grad(set_to_none=True)
    total, parts = model.loss(out, labels)
    assert set(parts) == {"paradoxical", "aux", "aux1", "aux3", "classification", "total"}
    assert parts["total"] == pytest.approx(
        parts["paradoxical"] + parts["aux"] + parts["classification"], rel=1e-5
    )
    assert parts["aux"] == pytest.approx(parts["aux1"] + parts["aux3"], rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in model.aux.parameters())
    assert all(p.grad is not None for p in model.stacks.parameters())


def test_paradoxical_loss_formula(lite):
    dummy = LayerOutput(torch.zeros(1), torch.zeros(1), torch.zeros(1))
    y = torch.tensor([1.0, 0.0, 1.0])
    z1 = torch.tensor([2.0, 2.0, -1.0])
    z3 = torch.tensor([0.0, -1.0, 1.0])
    out = MagNetOutput(logit=torch.zeros(3), aux_logits={1: z1, 3: z3}, layers=[dummy])
    _, parts = lite.loss(out, y)
    p1, p3 = torch.sigmoid(z1), torch.sigmoid(z3)
    pt1 = torch.where(y > 0, p1, 1 - p1)
    pt3 = torch.where(y > 0, p3, 1 - p3)
    ref = torch.clamp(pt1 - pt3, min=0).mean()
    assert parts["paradoxical"] == pytest.approx(float(ref), rel=1e-6)
    assert parts["classification"] == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)


# ----------------------------------------------------------------------------- grey filter


def test_grey_filter_on_crafted_image():
    px = torch.tensor(
        [
            [100, 114, 100],  # max diff 14 → grey → black
            [100, 115, 100],  # 15 → kept
            [0, 0, 0],
            [255, 255, 255],  # white glass → black
            [200, 50, 50],  # tissue → kept
            [120, 128, 134],  # pairwise 8, 14, 6 → black
            [120, 128, 135],  # 15 between R and B → kept
        ],
        dtype=torch.uint8,
    )
    img8 = px.T.reshape(3, 1, -1)  # (3, 1, 7)
    keep = torch.tensor([False, True, False, False, True, False, True])
    out8 = grey_filter(img8)
    assert torch.equal(out8.bool().any(0)[0], keep)
    assert torch.equal(out8[:, 0, keep], img8[:, 0, keep])
    imgf = img8.float() / 255
    outf = grey_filter(imgf[None])[0]
    assert torch.equal(outf.bool().any(0)[0], keep)
    assert torch.equal(outf[:, 0, keep], imgf[:, 0, keep])
    assert (outf[:, 0, ~keep] == 0).all()


def test_model_applies_grey_filter_to_both_inputs(lite):
    """A grey/white input behaves exactly like a black one inside the model."""
    lite.eval()
    colour = coloured_slides(1, 112, seed=9)
    lo = F.interpolate(colour, size=56, mode="bilinear", align_corners=False)
    grey_lo, grey_hi = lo.clone(), colour.clone()
    grey_lo[..., :20, :] = 0.8  # a band of glass
    grey_hi[..., :40, :] = 0.8
    black_lo, black_hi = lo.clone(), colour.clone()
    black_lo[..., :20, :] = 0.0
    black_hi[..., :40, :] = 0.0
    with torch.no_grad():
        a = lite.magnify_layer(1, grey_lo, grey_hi)
        b = lite.magnify_layer(1, black_lo, black_hi)
    assert torch.equal(a.theta, b.theta)
    assert torch.equal(a.patches, b.patches)


# ----------------------------------------------------------------------------- eval, augment


def test_eval_batch1_deterministic_and_train_batch1(lite):
    slides = coloured_slides(1, 256, seed=4)
    read_hi, _ = sampling_reader(lite, slides)
    views = layer1_views(lite, slides)
    lite.eval()
    with torch.no_grad():
        a = lite(*views, read_hi)
        b = lite(*views, read_hi)
    assert torch.equal(a.logit, b.logit)
    assert a.logit.shape == (1,)
    lite.train()
    with torch.no_grad():
        c = lite(*views, read_hi)
    lite.eval()
    assert torch.isfinite(c.logit).all()


def test_dihedral_coordinates_and_region_reads():
    S = 32
    g = normalized_grid(S, False)
    coords = torch.stack([g.view(1, S).expand(S, S), g.view(S, 1).expand(S, S)])  # (2, H, W)
    slide = coloured_slides(1, 64, seed=2)
    chain = torch.tensor([[[0.3, 0.0, 0.25], [0.0, 0.3, -0.4]]])
    for k in range(4):
        for flip in (False, True):
            op = Dihedral(k, flip)
            A = op.matrix()
            # apply(X)(u) = X(A u): apply to the coordinate image itself
            moved = op.apply(coords)
            assert torch.allclose(moved, torch.einsum("ij,jhw->ihw", A, coords), atol=1e-6)
            # sampling the augmented slide at chain == sampling the slide at to_original(chain)
            grid_aug = F.affine_grid(chain, [1, 3, 16, 16], align_corners=False)
            a = F.grid_sample(op.apply(slide), grid_aug, align_corners=False)
            orig = op.to_original(chain)
            b = F.grid_sample(
                slide, F.affine_grid(orig, [1, 3, 16, 16], align_corners=False), align_corners=False
            )
            assert torch.allclose(a, b, atol=1e-5)
            # … == apply() of the axis-aligned box read at the moved centre
            box = torch.cat([torch.eye(2).unsqueeze(0) * 0.3, orig[:, :, 2:]], -1)
            c = op.apply(
                F.grid_sample(
                    slide,
                    F.affine_grid(box, [1, 3, 16, 16], align_corners=False),
                    align_corners=False,
                )
            )
            assert torch.allclose(a, c, atol=1e-5)
    (x, y), op = augment(slide, slide[:, :1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, :1], y) and torch.equal(x, op.apply(slide))


def test_autocast_bf16_keeps_theta_and_sampling_in_fp32(lite):
    """Under bf16 autocast, entmax/θ and the sampler stay fp32 and gradients flow."""
    model = build(LITE, seed=4).train()
    x = coloured_slides(6, 112, seed=6)
    lo = F.interpolate(x, size=56, mode="bilinear", align_corners=False)
    hi = F.interpolate(x, size=448, mode="bilinear", align_corners=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.magnify_layer(3, lo, hi)
    assert out.theta.dtype == out.maps.dtype == out.patches.dtype == torch.float32
    out.theta.retain_grad()
    out.patches.square().mean().backward()
    assert torch.isfinite(out.theta.grad).all() and out.theta.grad.abs().sum() > 0
    with torch.no_grad():
        ref = model.magnify_layer(3, lo, hi)
    # bf16 maps move θ a little; the sampling itself is exact fp32 for the θ it was given
    from napari_magnet.models.sampler import affine_sample

    again = affine_sample(
        hi.repeat_interleave(3, 0),
        out.theta.detach().reshape(-1, 2, 3),
        224,
        align_corners=False,
        linearized=False,
    )
    assert torch.allclose(again, out.patches.detach(), atol=1e-6)
    assert (out.theta - ref.theta).abs().max() < 0.1


def _gru_input_dtypes(model: MagNet, device: str, dtype: torch.dtype, scale: float):
    seen = []
    hook = model.gru.register_forward_hook(
        lambda mod, inp, out: seen.append((inp[0].dtype, out[0].dtype))
    )
    patches = coloured_slides(2 * 4, model.config.final_size, seed=8).to(device) * scale
    try:
        with torch.no_grad(), torch.autocast(device, dtype=dtype):
            logits = model.classify(patches, batch=2)
    finally:
        hook.remove()
    return seen, logits


def test_gru_runs_in_float32_under_autocast(lite):
    """cuDNN autocast runs RNNs in float16; an unsettled eval-mode backbone's features of ~1e7
    overflowed it to NaN on CUDA. The GRU is kept in float32 on every device."""
    model = build(LITE, seed=5).eval()
    seen, logits = _gru_input_dtypes(model, "cpu", torch.bfloat16, 1.0)
    assert seen == [(torch.float32, torch.float32)]
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gru_stays_finite_on_huge_features_under_cuda_autocast():
    model = build(LITE, seed=5).cuda().eval()
    # inputs scaled by 1e7 through a ReLU/BatchNorm trunk at its initial statistics give
    # features far past float16's range (bf16 autocast: the trunk itself stays finite)
    seen, logits = _gru_input_dtypes(model, "cuda", torch.bfloat16, 1e7)
    assert seen == [(torch.float32, torch.float32)]
    assert torch.isfinite(logits).all()
