"""ZoomMIL's module: shapes, the two selection modes, gradients, ABMIL, checkpoints, FLOPs."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from napari_magnet.bags.encoders import RandomFeaturesWarning
from napari_magnet.models.checkpoints import load_checkpoint, save_checkpoint
from napari_magnet.models.registry import load_model
from napari_magnet.models.zoommil import (
    ZOOMMIL_CONFIGS,
    ZoomMIL,
    ZoomMILConfig,
    bag_sizes,
    slide_flops,
)

# napari-small's weights are not shipped yet: its features are random until they are.
pytestmark = pytest.mark.filterwarnings("ignore::napari_magnet.bags.encoders.RandomFeaturesWarning")

N0 = 20
CONFIG = ZoomMILConfig(k=(3, 5))  # 8 → 4 → 1 µm/px: 4 then 16 children per patch
D = CONFIG.feature_dim


class Bags:
    """A whole nested bag of random features, answering ``children`` and recording calls."""

    def __init__(self, config: ZoomMILConfig, n0: int = N0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.fan = [config.fan_out(m) ** 2 for m in range(config.steps - 1)]
        sizes = [n0]
        for c in self.fan:
            sizes.append(sizes[-1] * c)
        self.features = [torch.randn(n, config.feature_dim, generator=g) for n in sizes]
        self.calls: list[tuple[int, torch.Tensor]] = []

    @property
    def first(self) -> torch.Tensor:
        return self.features[0]

    def rows(self, m: int, members: torch.Tensor) -> torch.Tensor:
        c = self.fan[m]
        return (members[:, None] * c + torch.arange(c)).reshape(-1)

    def children(self, m: int, members: torch.Tensor) -> torch.Tensor:
        self.calls.append((m, members.clone()))
        table = self.features[m + 1]
        return table[self.rows(m, members)].reshape(len(members), self.fan[m], -1)


@pytest.fixture(scope="module")
def model() -> ZoomMIL:
    torch.manual_seed(0)
    return ZoomMIL(CONFIG).eval()


def test_evaluation_shapes_and_hard_selection(model):
    bags = Bags(CONFIG)
    out = model(bags.first, bags.children)
    assert out.logits.shape == (1, 2)
    assert len(out.levels) == 3
    sizes = [len(level.members) for level in out.levels]
    assert sizes == [N0, 3 * 4, 5 * 16] == list(bag_sizes(CONFIG, N0))
    for level in out.levels:
        assert level.attention.shape == level.members.shape
        torch.testing.assert_close(level.attention.sum(), torch.tensor(1.0))
        assert level.pooled.shape == (CONFIG.hidden,)
    for level, k in zip(out.levels[:2], CONFIG.k):
        assert level.scores.shape == level.members.shape
        # the hard top-K by descending score
        assert level.selected.tolist() == torch.topk(level.scores, k).indices.tolist()
    last = out.levels[-1]
    assert last.scores is None and last.selected is None
    assert out.levels[0].members.tolist() == list(range(N0))


def test_evaluation_embeds_only_the_children_of_the_selected(model):
    bags = Bags(CONFIG)
    out = model(bags.first, bags.children)
    assert [m for m, _ in bags.calls] == [0, 1]
    for (m, asked), level, after in zip(bags.calls, out.levels, out.levels[1:]):
        assert asked.tolist() == level.members[level.selected].tolist()
        assert after.members.tolist() == bags.rows(m, asked).tolist()
    # the second bag is exactly those children's features: pooling them again gives g_2
    level = out.levels[1]
    h = model.project[1](bags.features[1][level.members])
    a = torch.softmax(model.attend[1](h), dim=0)
    torch.testing.assert_close(a, level.attention)
    torch.testing.assert_close(a @ h, level.pooled)
    # the logits are the classifier of g_1 + g_2 + g_3
    pooled = sum(level.pooled for level in out.levels)
    torch.testing.assert_close(out.logits, model.classifier(pooled[None]))


def test_zoom_streams_each_magnification_before_asking_for_its_children(model):
    bags = Bags(CONFIG)
    stream = model.zoom(bags.first, bags.children)
    first = next(stream)
    assert bags.calls == [] and len(first.members) == N0
    second = next(stream)
    assert len(bags.calls) == 1 and len(second.members) == 12
    next(stream)
    assert len(bags.calls) == 2
    with pytest.raises(StopIteration) as stop:
        next(stream)
    assert stop.value.value.logits.shape == (1, 2)


def test_training_mixes_every_patch_and_matches_evaluation_as_the_noise_vanishes():
    config = replace(CONFIG, sigma=1e-6, samples=8, dropout=0.0)
    torch.manual_seed(1)
    model = ZoomMIL(config)
    bags = Bags(config)
    model.eval()
    hard = model(bags.first, bags.children)
    model.train()
    bags.calls.clear()
    soft = model(bags.first, bags.children, torch.Generator().manual_seed(0))
    # training asks for the children of every patch the soft bags mix: all of them
    assert [(m, len(asked)) for m, asked in bags.calls] == [(0, N0), (1, N0 * 4)]
    assert bags.calls[1][1].tolist() == list(range(N0 * 4))
    # without noise the soft selection is the hard one: same bags, same logits
    torch.testing.assert_close(soft.logits, hard.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(soft.levels, hard.levels):
        assert a.members.tolist() == b.members.tolist()
        torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=1e-5)


def test_gradients_reach_the_scoring_heads_through_the_perturbed_top_k():
    torch.manual_seed(2)
    model = ZoomMIL(replace(CONFIG, sigma=0.5, samples=50)).train()
    bags = Bags(model.config, seed=3)
    out = model(bags.first, bags.children, torch.Generator().manual_seed(4))
    F.cross_entropy(out.logits, torch.tensor([1])).backward()
    for head in model.score:
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in model.encoder.parameters())

    # the generator alone draws the selection noise (dropout draws from torch's RNG)
    def logits(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return model(bags.first, bags.children, torch.Generator().manual_seed(seed)).logits

    torch.testing.assert_close(logits(4), logits(4), rtol=0, atol=0)
    assert not torch.equal(logits(4), logits(5))

    # the hard top-K passes no gradient: in evaluation the scoring heads get none
    model.zero_grad(set_to_none=True)
    out = model(bags.first, bags.children)
    F.cross_entropy(out.logits, torch.tensor([1])).backward()
    assert all(p.grad is None for head in model.score for p in head.parameters())


def test_the_encoder_is_frozen_and_stays_in_eval_mode(model):
    model.train()
    try:
        assert not model.encoder.training
        assert all(not p.requires_grad for p in model.encoder.parameters())
        assert model.project[0].training
    finally:
        model.eval()
    keys = model.state_dict().keys()
    assert any(k.startswith("encoder.") for k in keys)
    patches = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert model.encoder(patches).shape == (2, D)


def test_a_feature_length_other_than_the_encoders_is_refused():
    with pytest.raises(ValueError, match="feature_dim"):
        ZoomMIL(replace(CONFIG, feature_dim=64))


def test_abmil_is_one_magnification_without_zoom():
    model = load_model("abmil", device="cpu")
    assert model.config == ZOOMMIL_CONFIGS["abmil"]
    bags = Bags(model.config, n0=30)
    out = model(bags.first, bags.children)
    assert bags.calls == []
    (level,) = out.levels
    assert level.scores is None and level.selected is None
    assert level.members.tolist() == list(range(30))
    assert len(model.score) == 0
    # training needs no generator draw and back-propagates to the attention head
    model.train()
    out = model(bags.first, bags.children, torch.Generator().manual_seed(0))
    out.logits.sum().backward()
    assert model.attend[0].w.weight.grad is not None


def test_bags_smaller_than_k_select_everything(model):
    bags = Bags(CONFIG, n0=2)
    out = model(bags.first, bags.children)
    assert [len(level.members) for level in out.levels] == [2, 2 * 4, 5 * 16]
    assert sorted(out.levels[0].selected.tolist()) == [0, 1]


def test_bad_inputs_are_refused(model):
    bags = Bags(CONFIG)
    with pytest.raises(ValueError, match="first"):
        model(bags.first[:, :10], bags.children)
    with pytest.raises(ValueError, match="children"):
        model(bags.first, lambda m, members: torch.zeros(len(members), 3, D))


def test_checkpoint_round_trip(tmp_path):
    model = load_model("zoommil", device="cpu")
    with torch.no_grad():  # make every weight differ from a fresh build, the encoder's too
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights, _ = save_checkpoint(model, tmp_path / "zm")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomFeaturesWarning)
        loaded = load_checkpoint(weights)
        by_name = load_model(str(weights), device="cpu")
    assert isinstance(loaded, ZoomMIL) and loaded.config == model.config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.checkpoint_sha256 == by_name.checkpoint_sha256 != ""
    bags = Bags(model.config)
    torch.testing.assert_close(
        model.eval()(bags.first, bags.children).logits, loaded(bags.first, bags.children).logits
    )
    patches = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(model.encoder(patches), loaded.encoder(patches))


def test_flops_count_encoder_and_head():
    zoommil = load_model("zoommil", device="cpu")
    abmil = load_model("abmil", device="cpu")
    n0 = 64  # an 8192² slide at 0.5 µm/px: 8 × 8 patches at 8 µm/px
    zoom = slide_flops(zoommil, bag_sizes(zoommil.config, n0))
    k0, k1 = zoommil.config.k
    assert zoom.patches == (64, k0 * 4, k1 * 16)
    assert zoom.encoder_per_patch > 1e6
    assert zoom.encoder == zoom.encoder_per_patch * sum(zoom.patches)
    assert 0 < zoom.head < zoom.encoder
    assert zoom.total == zoom.encoder + zoom.head
    # the head: 3 projections, 3 attention and 2 scoring heads, the classifier (x2 per MAC)
    h, a = zoommil.config.hidden, zoommil.config.attention_hidden
    per_row = 2 * (D * h + 2 * h * a + a + h)
    expected = sum(n * per_row for n in zoom.patches) + 2 * sum(
        n * (2 * h * a + a) for n in zoom.patches[:2]
    )
    assert zoom.head == expected + 2 * h * 2
    flat = slide_flops(abmil, (n0 * 64,))  # every 1 µm/px patch
    assert flat.encoder_per_patch == zoom.encoder_per_patch
    assert flat.total > 10 * zoom.total
    with pytest.raises(ValueError):
        slide_flops(zoommil, (1, 2))
