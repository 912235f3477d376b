"""The attention-sampling model (DESIGN §5): config, shapes, sampling, unbiased wiring."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from napari_magnet.models.ats import (
    ATS_CONFIGS,
    ATSConfig,
    ATSOutput,
    AttentionSampling,
    build_ats,
)
from napari_magnet.models.ats import estimators as est

from . import _reference as ref


def crop_reader(image: torch.Tensor, patch: int):
    """read_patches for a (3, H, W) image: centres (B, n, 2) normalised xy → (B*n, 3, P, P).

    Every view is the whole image; a patch is the P×P crop centred on the centre (zero-padded
    outside the image) — the same contract the engine implements on the slide pyramid.
    """
    _, h, w = image.shape
    padded = F.pad(image, (patch, patch, patch, patch))
    calls = []

    def read(centres: torch.Tensor) -> torch.Tensor:
        calls.append(centres.clone())
        out = []
        for x, y in centres.reshape(-1, 2).tolist():
            cx, cy = int(x * w), int(y * h)
            x0, y0 = cx - patch // 2 + patch, cy - patch // 2 + patch
            out.append(padded[:, y0 : y0 + patch, x0 : x0 + patch])
        return torch.stack(out)

    read.calls = calls
    return read


# ------------------------------------------------------------------------------------ config


def test_config_roundtrip_hash_and_frozen():
    c = ATSConfig()
    d = c.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ATSConfig.from_dict(d) == c
    assert ATSConfig.from_dict(d).config_hash() == c.config_hash()
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert c.canonical_json() == canonical
    assert c.config_hash() == hashlib.sha256(canonical.encode("ascii")).hexdigest()
    assert ATSConfig.from_dict({"name": "x"}) == ATSConfig(name="x")  # missing keys: defaults
    assert AttentionSampling.architecture == "ats"
    assert dataclasses.replace(c, epsilon=0.01).config_hash() != c.config_hash()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_patches = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        ATSConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        ATSConfig(epsilon=2.0)


def test_named_configs():
    assert set(ATS_CONFIGS) == {
        "ats",
        "ats-p50-n1",
        "ats-p50-n5",
        "ats-p50-n20",
        "ats-p20-n5",
        "ats-2level",
    }
    for name, factory in ATS_CONFIGS.items():
        c = factory()
        assert c.name == name
        assert isinstance(c, ATSConfig)
    assert (ATS_CONFIGS["ats"]().patch_size, ATS_CONFIGS["ats"]().n_patches) == (50, 20)
    assert (ATS_CONFIGS["ats-p20-n5"]().patch_size, ATS_CONFIGS["ats-p20-n5"]().n_patches) == (
        20,
        5,
    )
    assert ATS_CONFIGS["ats-p50-n1"]().n_patches == 1
    hashes = {f().config_hash() for f in ATS_CONFIGS.values()}
    assert len(hashes) == len(ATS_CONFIGS)
    m = build_ats("ats-p50-n5")
    assert m.config == ATS_CONFIGS["ats-p50-n5"]()
    assert AttentionSampling.from_config(m.config.to_dict()).config == m.config
    with pytest.raises(KeyError):
        build_ats("nope")


def test_two_level_config():
    one = ATSConfig()
    # one-level configs do not carry (or hash) the two-level fields
    assert not set(ATSConfig.TWO_LEVEL_FIELDS) & set(one.to_dict())
    two = ATS_CONFIGS["ats-2level"]()
    d = two.to_dict()
    assert set(ATSConfig.TWO_LEVEL_FIELDS) <= set(d) and d["two_level"] is True
    assert ATSConfig.from_dict(json.loads(json.dumps(d))) == two
    assert (two.n_regions, two.n_patches, two.total_patches) == (5, 4, 20)
    assert (two.region_side, two.patch_side) == (1024.0, 200.0)
    m = AttentionSampling(two)
    assert m.region_attention_net is not None and m.attention_net is not m.region_attention_net
    att_ids = {id(p) for p in m.attention_parameters()}
    assert {id(p) for p in m.region_attention_net.parameters()} <= att_ids
    assert m.pixels_processed((256, 256)) == (256 * 256 + 5 * 64 * 64 + 20 * 50 * 50) * 3
    with pytest.raises(ValueError, match="must fit inside its region"):
        ATSConfig(two_level=True, region_size=10, region_level_scale=4.0)
    with pytest.raises(ValueError):
        ATSConfig(two_level=True, n_regions=0)
    with pytest.raises(ValueError, match="one-level"):
        AttentionSampling(one).region_attention(torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------------------------- components


def test_attention_is_a_distribution_with_epsilon_floor():
    torch.manual_seed(0)
    eps = 0.05
    m = AttentionSampling(ATSConfig(epsilon=eps)).eval()
    view = torch.rand(2, 3, 24, 40)
    a = m.attention(view)
    assert a.shape == (2, 24, 40)
    torch.testing.assert_close(a.sum(dim=(1, 2)), torch.ones(2), rtol=0, atol=1e-5)
    assert float(a.detach().min()) >= eps / (24 * 40) * (1 - 1e-5)
    with pytest.raises(ValueError):
        m.attention(torch.rand(2, 1, 8, 8))


def test_networks_match_the_design():
    m = AttentionSampling(ATSConfig(feature_dim=12))
    convs = [layer for layer in m.attention_net.modules() if isinstance(layer, torch.nn.Conv2d)]
    bns = [layer for layer in m.attention_net.modules() if isinstance(layer, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [8, 8, 8, 1]
    assert all(c.kernel_size == (3, 3) for c in convs) and len(bns) == 3
    fconvs = [layer for layer in m.feature_net.modules() if isinstance(layer, torch.nn.Conv2d)]
    assert [c.out_channels for c in fconvs] == [16] * 4
    feats = m.feature_net(torch.rand(5, 3, 20, 20))
    assert feats.shape == (5, 12)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(5), rtol=0, atol=1e-5)
    assert m.classifier.in_features == 12 and m.classifier.out_features == 2


def test_positions_to_centres_exact():
    idx = torch.tensor([[0, 3, 5, 11]])  # grid h'=3, w'=4
    c = AttentionSampling.positions_to_centres(idx, (3, 4), (3, 4))
    expected = torch.tensor([[[0.125, 1 / 6], [0.875, 1 / 6], [0.375, 0.5], [0.875, 5 / 6]]])
    torch.testing.assert_close(c, expected)
    # a coarser attention grid over a larger view maps to the same normalised centres
    torch.testing.assert_close(
        AttentionSampling.positions_to_centres(idx, (3, 4), (30, 40)), expected
    )


@pytest.mark.parametrize("replace", [False, True])
def test_sample_indices_probabilities_and_order(replace):
    m = AttentionSampling()
    a = torch.tensor([0.03, 0.03, 0.88, 0.03, 0.03]).reshape(1, 1, 5).expand(4000, 1, 5)
    a = a.clone().requires_grad_()
    idx, p = m.sample(a, 3, replace, generator=torch.Generator().manual_seed(5))
    assert idx.shape == (4000, 3) and idx.dtype == torch.int64
    torch.testing.assert_close(p, a.detach().reshape(4000, 5).gather(1, idx))
    assert p.requires_grad
    if not replace:
        assert all(len(set(r)) == 3 for r in idx[:200].tolist())
    # sampling order: the peak comes first ~88% of the time
    assert float((idx[:, 0] == 2).float().mean()) == pytest.approx(0.88, abs=0.03)


def test_sample_respects_generator():
    m = AttentionSampling()
    a = torch.rand(2, 6, 7)
    a = a / a.sum(dim=(1, 2), keepdim=True)
    for replace in (False, True):
        i1, _ = m.sample(a, 4, replace, torch.Generator().manual_seed(11))
        i2, _ = m.sample(a, 4, replace, torch.Generator().manual_seed(11))
        assert torch.equal(i1, i2)


# ---------------------------------------------------------------------------- full forward


@pytest.mark.parametrize("replace", [False, True])
def test_full_forward_shapes_and_gradients(replace):
    torch.manual_seed(0)
    cfg = ATSConfig(
        view_size=32, patch_size=12, n_patches=5, replace=replace, n_classes=3, feature_dim=8
    )
    m = AttentionSampling(cfg)
    image = torch.rand(3, 96, 128)  # the "slide" at patch resolution; the view is its 4× reduction
    view = F.interpolate(image[None], size=(24, 32), mode="bilinear", align_corners=False).expand(
        2, -1, -1, -1
    )
    reader = crop_reader(image, cfg.patch_size)
    out = m(view, reader, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, ATSOutput)
    assert out.logits.shape == (2, 3) and out.probabilities.shape == (2, 3)
    torch.testing.assert_close(out.probabilities.sum(1), torch.ones(2))
    assert out.attention.shape == (2, 24, 32)
    assert out.indices.shape == (2, 5) and out.sampled_attention.shape == (2, 5)
    assert out.draw_log_probs.shape == (2, 5)
    assert (
        out.centres.shape == (2, 5, 2)
        and float(out.centres.min()) > 0
        and float(out.centres.max()) < 1
    )
    assert out.patches.shape == (10, 3, 12, 12)
    assert out.features.shape == (2, 8)
    assert len(reader.calls) == 1 and torch.equal(reader.calls[0], out.centres)
    # patches really are crops of the image at the sampled centres
    x, y = out.centres[1, 2].tolist()
    cx, cy = int(x * 128), int(y * 96)
    if 6 <= cx <= 128 - 6 and 6 <= cy <= 96 - 6:
        torch.testing.assert_close(
            out.patches[1 * 5 + 2], image[:, cy - 6 : cy + 6, cx - 6 : cx + 6]
        )
    # forward value of the surrogate is the plain estimate
    feats = m.feature_net(out.patches).reshape(2, 5, -1)
    plain = feats.mean(1) if replace else est.ats_terms(feats, out.sampled_attention).mean(1)
    torch.testing.assert_close(out.features, plain)
    # gradients reach all three networks
    F.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    for net in (m.attention_net, m.feature_net, m.classifier):
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(float(g.abs().sum()) > 0 for g in grads)
    assert m.pixels_processed() == 24 * 32 * 3 + 5 * 12 * 12 * 3


def test_pixels_processed_default_and_talk_figure():
    m = build_ats("ats")
    assert m.pixels_processed() == 256 * 256 * 3 + 20 * 50 * 50 * 3
    assert m.pixels_processed((1040, 1388)) == 1040 * 1388 * 3 + 20 * 50 * 50 * 3


def test_read_patches_shape_is_checked():
    m = AttentionSampling(ATSConfig(patch_size=8, n_patches=2))
    with pytest.raises(ValueError):
        m(torch.rand(1, 3, 8, 8), lambda c: torch.zeros(2, 3, 7, 7))


def test_forward_in_eval_mode_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    m = AttentionSampling(ATSConfig(patch_size=8, n_patches=4)).eval()
    image = torch.rand(3, 64, 64)
    view = F.interpolate(image[None], size=(16, 16), mode="area")
    with torch.no_grad():
        o1 = m(view, crop_reader(image, 8), generator=torch.Generator().manual_seed(3))
        o2 = m(view, crop_reader(image, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(o1.indices, o2.indices)
    torch.testing.assert_close(o1.logits, o2.logits)


# ----------------------------------------------- the model's wiring is unbiased (enumeration)


@pytest.mark.parametrize("replace", [False, True])
def test_classify_gradient_unbiased_by_exact_enumeration(replace):
    """E over every ordered draw of the model's logits and of their gradients (to the attention
    logits and to the feature network) equals those of the exact, attention-weighted model."""
    torch.manual_seed(0)
    k, n = 5, 3
    m = AttentionSampling(ATSConfig(patch_size=6, n_patches=n, feature_dim=4, n_classes=2)).double()
    theta0 = torch.tensor([0.3, -1.0, 0.8, 0.1, -0.4], dtype=torch.float64)
    patches_all = torch.rand(k, 3, 6, 6, dtype=torch.float64)
    v = torch.tensor([1.0, -2.0], dtype=torch.float64)
    w = m.feature_net.proj.weight

    theta = theta0.clone().requires_grad_()
    a = theta.softmax(0)
    exact_logits = m.classifier((a[:, None] * m.feature_net(patches_all)).sum(0))
    g_theta_true, g_w_true = torch.autograd.grad(v @ exact_logits, (theta, w))

    a0 = theta0.softmax(0)
    draws = (
        itertools.product(range(k), repeat=n) if replace else itertools.permutations(range(k), n)
    )
    e_logits, e_gt, e_gw, total = 0.0, 0.0, 0.0, 0.0
    for s in draws:
        p, used = 1.0, 0.0
        for j in s:
            p *= float(a0[j]) / (1.0 if replace else 1.0 - used)
            used += float(a0[j])
        theta = theta0.clone().requires_grad_()
        att = theta.softmax(0).reshape(1, 1, k)
        idx = torch.tensor([s])
        logits, _ = m.classify(patches_all[idx[0]], att, idx, replace=replace)
        g_t, g_w = torch.autograd.grad(v @ logits[0], (theta, w))
        total += p
        e_logits = e_logits + p * logits[0].detach()
        e_gt = e_gt + p * g_t
        e_gw = e_gw + p * g_w
    assert total == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(e_logits, exact_logits.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(e_gt, g_theta_true, rtol=0, atol=1e-10)
    torch.testing.assert_close(e_gw, g_w_true, rtol=0, atol=1e-10)


@pytest.mark.parametrize("replace", [False, True])
def test_two_level_estimate_unbiased_by_exact_enumeration(replace):
    """Two-level: E over every ordered region draw and, independently per drawn region, every
    ordered patch draw, of the logits and their gradients (to both attentions' logits and to
    the feature network) equals the exact nested model ``Σ_k a_k Σ_j a'_{kj} f_{kj}``."""
    torch.manual_seed(1)
    k1, n1, k2, n2 = 3, 2, 3, 2
    cfg = ATSConfig(
        patch_size=5,
        n_patches=n2,
        feature_dim=3,
        two_level=True,
        n_regions=n1,
        region_size=3,
        region_level_scale=2.0,
        patch_level_scale=1.0,
    )
    m = AttentionSampling(cfg).double()
    theta0 = torch.tensor([0.4, -0.7, 0.2], dtype=torch.float64)
    phi0 = torch.tensor([[0.1, 0.9, -0.5], [-0.3, 0.0, 0.6], [1.2, -0.8, 0.3]], dtype=torch.float64)
    patches_all = torch.rand(k1, k2, 3, 5, 5, dtype=torch.float64)
    v = torch.tensor([0.7, -1.3], dtype=torch.float64)
    w = m.feature_net.proj.weight

    def grads(logits_row, theta, phi):
        return torch.autograd.grad(v @ logits_row, (theta, phi, w))

    theta, phi = theta0.clone().requires_grad_(), phi0.clone().requires_grad_()
    a, b = theta.softmax(0), phi.softmax(1)
    f = m.feature_net(patches_all.reshape(-1, 3, 5, 5)).reshape(k1, k2, -1)
    exact_logits = m.classifier((a[:, None] * (b[:, :, None] * f).sum(1)).sum(0))
    true = grads(exact_logits, theta, phi)

    def ordered(k, n, probs):
        draws = (
            itertools.product(range(k), repeat=n)
            if replace
            else itertools.permutations(range(k), n)
        )
        for s in draws:
            p, used = 1.0, 0.0
            for j in s:
                p *= float(probs[j]) / (1.0 if replace else 1.0 - used)
                used += float(probs[j])
            yield s, p

    a0, b0 = theta0.softmax(0), phi0.softmax(1)
    total, e_logits, e_grads = 0.0, 0.0, [0.0, 0.0, 0.0]
    for s1, p1 in ordered(k1, n1, a0):
        inner = [list(ordered(k2, n2, b0[r])) for r in s1]
        for combo in itertools.product(*inner):
            p = p1 * math.prod(q for _, q in combo)
            theta, phi = theta0.clone().requires_grad_(), phi0.clone().requires_grad_()
            att = theta.softmax(0).reshape(1, 1, k1)
            region_att = phi.softmax(1)[list(s1)].reshape(n1, 1, k2)
            region_idx = torch.tensor([list(s2) for s2, _ in combo])
            patches = torch.stack([patches_all[r, j] for r, (s2, _) in zip(s1, combo) for j in s2])
            logits, _ = m.classify_two_level(
                patches, att, torch.tensor([s1]), region_att, region_idx, replace=replace
            )
            g = grads(logits[0], theta, phi)
            total += p
            e_logits = e_logits + p * logits[0].detach()
            e_grads = [e + p * gi for e, gi in zip(e_grads, g)]
    assert total == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(e_logits, exact_logits.detach(), rtol=0, atol=1e-10)
    for got, want in zip(e_grads, true):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # the region attention's gradient is far from zero next to the 1e-10 tolerance, so a
    # dropped or biased inner gradient would be caught
    assert true[1].abs().max() > 1e-5


def test_two_level_forward_reads_regions_then_patches_inside_them():
    torch.manual_seed(0)
    cfg = ATSConfig(
        patch_size=6,
        n_patches=3,
        feature_dim=5,
        two_level=True,
        n_regions=2,
        region_size=12,
        region_level_scale=2.0,
        patch_level_scale=1.0,
    )
    m = AttentionSampling(cfg)
    image = torch.rand(3, 96, 96)
    view = F.interpolate(image[None], size=(16, 16), mode="area").expand(2, -1, -1, -1).contiguous()
    region_side = 24 / 96  # 12 region pixels × 2 image pixels each, as a fraction of the view
    seen = {}

    def read_regions(centres):
        seen["regions"] = centres.clone()
        full = crop_reader(image, 24)(centres)
        return F.interpolate(full, size=(12, 12), mode="area")

    def read_patches(region_centres, patch_centres):
        b, n1 = region_centres.shape[:2]
        # patch centres are region-normalised: back to view-normalised coordinates
        origin = (region_centres - region_side / 2).reshape(b * n1, 1, 2)
        seen["patches"] = origin + patch_centres * region_side
        return crop_reader(image, 6)(seen["patches"])

    out = m(view, read_patches, torch.Generator().manual_seed(3), read_regions=read_regions)
    assert out.logits.shape == (2, 2) and out.patches.shape == (2 * 2 * 3, 3, 6, 6)
    assert out.region_attention.shape == (4, 12, 12)
    assert out.region_indices.shape == (4, 3) and out.region_centres.shape == (4, 3, 2)
    assert out.draw_log_probs.shape == (2, 2 + 2 * 3)
    torch.testing.assert_close(out.region_attention.sum(dim=(1, 2)), torch.ones(4))
    # every patch centre lies inside its region
    centres = seen["regions"].reshape(4, 1, 2)
    assert ((seen["patches"] - centres).abs() <= region_side / 2).all()
    out.logits.sum().backward()
    for net in (m.attention_net, m.region_attention_net, m.feature_net):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    with pytest.raises(ValueError, match="read_regions"):
        m(view, read_patches)


@pytest.mark.parametrize("two_level", [False, True])
def test_forward_masks_every_attention_map_before_drawing(two_level):
    """``visible(attention, level)`` masks the view's maps (level 1) and, after the regions are
    read, the regions' (level 2); the masked maps are distributions and nothing is drawn
    outside them. A map whose mask is all zero is only renormalised."""
    torch.manual_seed(0)
    cfg = ATSConfig(
        patch_size=6,
        n_patches=3,
        feature_dim=5,
        two_level=two_level,
        n_regions=2,
        region_size=12,
        region_level_scale=2.0,
        patch_level_scale=1.0,
    )
    m = AttentionSampling(cfg)
    image = torch.rand(3, 96, 96)
    view = F.interpolate(image[None], size=(16, 16), mode="area").expand(2, -1, -1, -1).contiguous()
    calls = []

    def visible(attention, level):
        calls.append((level, tuple(attention.shape)))
        mask = torch.zeros_like(attention)
        if level == 1:
            mask[:, :, :8] = 1  # the left half of the view shows the slide
        else:
            mask[0, :4, :4] = 1  # the first region shows a corner, the others nothing
        return mask

    def read_patches(centres, patch_centres=None):
        return torch.rand(2 * 3 * (2 if two_level else 1), 3, 6, 6)

    read_regions = (lambda centres: torch.rand(4, 3, 12, 12)) if two_level else None
    out = m(
        view,
        read_patches,
        torch.Generator().manual_seed(3),
        read_regions=read_regions,
        visible=visible,
    )
    assert [level for level, _ in calls] == ([1, 2] if two_level else [1])
    torch.testing.assert_close(out.attention.sum(dim=(1, 2)), torch.ones(2))
    assert float(out.attention.detach()[:, :, 8:].abs().sum()) == 0
    assert (out.centres[..., 0] < 0.5).all()
    if two_level:
        ra = out.region_attention.detach()
        torch.testing.assert_close(ra.sum(dim=(1, 2)), torch.ones(4))
        assert float(ra[0].sum() - ra[0, :4, :4].sum()) == 0
        assert (out.region_centres[0] < 4 / 12).all()
        assert (ra[1:] > 0).all()  # nothing visible: left whole
    with pytest.raises(ValueError, match="mask"):
        m(
            view,
            read_patches,
            read_regions=read_regions,
            visible=lambda attention, level: torch.ones(1, 2, 3),
        )


def test_strict_forward_refuses_more_distinct_draws_than_visible_positions():
    m = AttentionSampling(ATSConfig(patch_size=4, n_patches=3))
    view = torch.rand(1, 3, 8, 8)

    def two_cells(attention, level):
        mask = torch.zeros_like(attention)
        mask[0, 0, :2] = 1
        return mask

    read = lambda centres: torch.zeros(centres.shape[0] * centres.shape[1], 3, 4, 4)  # noqa: E731
    with pytest.raises(ValueError, match="cannot draw 3 distinct patches from 2 positions"):
        m(view, read, visible=two_cells, strict=True)
    assert m(view, read, visible=two_cells).indices.shape == (1, 3)  # training draws anyway
    assert m(view, read, visible=two_cells, n=2, strict=True).indices.shape == (1, 2)


# ---------------------------------------------------------------------------- REINFORCE


def test_reinforce_trainer_step_updates_both_parameter_groups():
    torch.manual_seed(0)
    cfg = ATSConfig(patch_size=8, n_patches=3, feature_dim=6)
    m = AttentionSampling(cfg)
    trainer = ref.ReinforceTrainer(m, entropy_weight=1e-2)
    assert trainer.attention_optimizer.defaults["betas"] == (0.999, 0.999)
    assert trainer.attention_optimizer.defaults["lr"] == 1e-3
    assert trainer.classifier_optimizer.defaults["lr"] == 1e-3
    att_ids = {id(p) for p in m.attention_parameters()}
    cls_ids = {id(p) for p in m.classifier_parameters()}
    assert not att_ids & cls_ids and len(att_ids) + len(cls_ids) == len(list(m.parameters()))

    image = torch.rand(3, 64, 64)
    view = F.interpolate(image[None], size=(16, 16), mode="area").expand(2, -1, -1, -1).contiguous()
    before_att = [p.detach().clone() for p in m.attention_parameters()]
    before_cls = [p.detach().clone() for p in m.classifier_parameters()]
    g = torch.Generator().manual_seed(0)
    stats = [
        trainer.step(view, crop_reader(image, 8), torch.tensor([0, 1]), generator=g)
        for _ in range(3)
    ]
    assert all(set(s) == {"loss", "attention_loss", "reward", "baseline"} for s in stats)
    assert trainer.baseline.value is not None
    assert any(not torch.equal(b, p) for b, p in zip(before_att, m.attention_parameters()))
    assert any(not torch.equal(b, p) for b, p in zip(before_cls, m.classifier_parameters()))


# ------------------------------------------------------------------ registry / checkpoints


def test_registered_with_the_registry_and_checkpoint_roundtrip(tmp_path):
    from napari_magnet.models import checkpoints, registry

    assert set(ATS_CONFIGS) <= set(registry.known_models())
    assert "ats" in registry.known_architectures()
    m = registry.load_model("ats-p20-n5", device="cpu")
    assert isinstance(m, AttentionSampling) and m.config == ATS_CONFIGS["ats-p20-n5"]()
    # same seed → same weights
    m2 = registry.load_model("ats-p20-n5", device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    checkpoints.save_checkpoint(m, tmp_path / "ats")
    loaded = registry.load_model(str(tmp_path / "ats.safetensors"), device="cpu")
    assert isinstance(loaded, AttentionSampling) and loaded.config == m.config
    assert all(
        torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values())
    )
    assert checkpoints.read_checkpoint(tmp_path / "ats").config_hash == m.config.config_hash()
    with pytest.raises(ValueError):  # a patch that does not fit in its region
        registry.build_architecture(
            "ats",
            {**m.config.to_dict(), "two_level": True, "region_size": 4, "region_level_scale": 1.0},
        )
    two = registry.load_model("ats-2level", device="cpu")
    checkpoints.save_checkpoint(two, tmp_path / "two")
    loaded = registry.load_model(str(tmp_path / "two.safetensors"), device="cpu")
    assert loaded.config == two.config and loaded.region_attention_net is not None
    assert all(
        torch.equal(a, b) for a, b in zip(two.state_dict().values(), loaded.state_dict().values())
    )
