"""Exact checks of the attention-sampling estimators (DESIGN §5).

The central tests enumerate every ordered draw of N = 3 samples from K = 5 positions with its
exact probability, so expectations are computed exactly (float64), not estimated.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from napari_magnet.models.ats import estimators as est
from napari_magnet.models.ats import gumbel_top_k

from . import _reference as ref

K, N, D = 5, 3, 2
DT = torch.float64
THETA = torch.tensor([0.3, -1.0, 0.8, 0.1, -0.4], dtype=DT)
FEATS = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.5, 0.7], [2.0, 1.0], [0.2, -0.9]], dtype=DT)
V = torch.tensor([0.7, -1.3], dtype=DT)  # upstream gradient (a linear read-out of F)


def attention_from(theta: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    a = theta.softmax(0)
    return (1 - epsilon) * a + epsilon / a.numel()


def draw_probability(a: torch.Tensor, s: tuple[int, ...], replace: bool) -> float:
    """Exact probability of the ordered draw ``s``."""
    p, used = 1.0, 0.0
    for k in s:
        ak = float(a[k])
        p *= ak if replace else ak / (1.0 - used)
        used += ak
    return p


def all_draws(replace: bool):
    return itertools.product(range(K), repeat=N) if replace else itertools.permutations(range(K), N)


def true_value_and_grads(epsilon: float = 0.0):
    theta = THETA.clone().requires_grad_()
    f = FEATS.clone().requires_grad_()
    a = attention_from(theta, epsilon)
    value = (a[:, None] * f).sum(0)
    (V @ value).backward()
    return value.detach(), theta.grad, f.grad


def enumerate_expectation(estimator, replace: bool, epsilon: float = 0.0, order=None):
    """Exact E[value], E[∇_θ (v·F̂)], E[∇_f (v·F̂)] and total probability over all ordered draws.

    ``order`` optionally rearranges each draw before it reaches the estimator (e.g. sorting).
    """
    a0 = attention_from(THETA, epsilon)
    total, e_val, e_gt, e_gf = 0.0, 0.0, 0.0, 0.0
    for s in all_draws(replace):
        p = draw_probability(a0, s, replace)
        s_used = order(s) if order else s
        theta = THETA.clone().requires_grad_()
        f = FEATS.clone().requires_grad_()
        a = attention_from(theta, epsilon)
        idx = torch.tensor(s_used)
        out = estimator(f[idx][None], a[idx][None])[0]
        (V @ out).backward()
        total += p
        e_val = e_val + p * out.detach()
        e_gt = e_gt + p * theta.grad
        e_gf = e_gf + p * f.grad
    return total, e_val, e_gt, e_gf


BASELINE = torch.tensor([[0.4, -0.25]], dtype=DT)  # (B, D), independent of the draw

ESTIMATORS = {
    "with": (est.expected_with_replacement, True),
    "with+baseline": (lambda f, a: est.expected_with_replacement(f, a, baseline=BASELINE), True),
    "without": (est.expected_without_replacement, False),
    "without+baseline": (
        lambda f, a: est.expected_without_replacement(f, a, baseline=BASELINE),
        False,
    ),
    "without+scalar-baseline": (
        lambda f, a: est.expected_without_replacement(f, a, baseline=0.8),
        False,
    ),
    "without+row-baseline": (
        lambda f, a: est.expected_without_replacement(
            f, a, baseline=torch.tensor([-0.6], dtype=DT)
        ),
        False,
    ),
    "dispatch-without": (lambda f, a: est.expectation(f, a, replace=False), False),
}


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_exact_enumeration_value_and_gradient_unbiased(name, epsilon):
    estimator, replace = ESTIMATORS[name]
    true_val, true_gt, true_gf = true_value_and_grads(epsilon)
    total, e_val, e_gt, e_gf = enumerate_expectation(estimator, replace, epsilon)
    assert total == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(e_val, true_val, rtol=0, atol=1e-12)
    torch.testing.assert_close(e_gt, true_gt, rtol=0, atol=1e-10)  # ∇ attention logits
    torch.testing.assert_close(e_gf, true_gf, rtol=0, atol=1e-10)  # ∇ features


@pytest.mark.parametrize(
    "biased", [ref.published_expected_without_replacement, ref.naive_expected_without_replacement]
)
def test_published_and_naive_gradients_are_biased(biased):
    true_val, true_gt, true_gf = true_value_and_grads()
    _, e_val, e_gt, e_gf = enumerate_expectation(biased, replace=False)
    # Their forward value is the unbiased ATS estimate ...
    torch.testing.assert_close(e_val, true_val, rtol=0, atol=1e-12)
    # ... and their feature gradient is fine (pathwise) ...
    torch.testing.assert_close(e_gf, true_gf, rtol=0, atol=1e-10)
    # ... but the expected attention gradient is not the true one (by a wide margin).
    assert (e_gt - true_gt).abs().max() > 0.1
    # Ours, on the very same case, is exact.
    _, _, ours, _ = enumerate_expectation(est.expected_without_replacement, replace=False)
    torch.testing.assert_close(ours, true_gt, rtol=0, atol=1e-10)


def test_enumeration_figures():
    """The numbers behind the report: true vs ours vs published (θ-gradient of v·Σ a f)."""
    _, true_gt, _ = true_value_and_grads()
    _, _, ours, _ = enumerate_expectation(est.expected_without_replacement, replace=False)
    _, _, pub, _ = enumerate_expectation(ref.published_expected_without_replacement, replace=False)
    _, _, naive, _ = enumerate_expectation(ref.naive_expected_without_replacement, replace=False)
    expected_true = torch.tensor([0.7882, -0.2258, -0.7475, 0.0269, 0.1582], dtype=DT)
    torch.testing.assert_close(true_gt, expected_true, rtol=0, atol=1e-4)
    assert (ours - true_gt).abs().max() < 1e-10
    assert (pub - true_gt).abs().max() > 0.5
    assert (naive - true_gt).abs().max() > 0.4


def test_surrogate_forward_equals_plain_estimate():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(4, 6, 5, generator=g)
    a = torch.rand(4, 6, generator=g) * 0.1 + 0.01
    plain_without = est.ats_terms(f, a).mean(1)
    assert torch.equal(est.expected_without_replacement(f, a), plain_without)
    assert torch.equal(
        est.expected_without_replacement(f, a, baseline=torch.randn(4, 5)), plain_without
    )
    assert torch.equal(est.expected_with_replacement(f, a), f.mean(1))
    assert torch.equal(est.expected_with_replacement(f, a, baseline=torch.randn(4)), f.mean(1))


def test_ats_terms_each_unbiased_and_formula():
    a = torch.tensor([[0.5, 0.2, 0.1]], dtype=DT)
    f = torch.tensor([[[1.0], [2.0], [4.0]]], dtype=DT)
    terms = est.ats_terms(f, a)[0, :, 0]
    # F_1 = f_1; F_2 = a_1 f_1 + (1 - a_1) f_2; F_3 = a_1 f_1 + a_2 f_2 + (1 - a_1 - a_2) f_3
    torch.testing.assert_close(
        terms, torch.tensor([1.0, 0.5 + 0.5 * 2, 0.5 + 0.4 + 0.3 * 4], dtype=DT)
    )
    logq = est.draw_log_probs(a, replace=False)[0]
    torch.testing.assert_close(logq.exp(), torch.tensor([0.5, 0.2 / 0.5, 0.1 / 0.3], dtype=DT))
    torch.testing.assert_close(
        est.sequence_log_prob(a, replace=False),
        torch.log(torch.tensor([0.5 * 0.4 * (0.1 / 0.3)], dtype=DT)),
    )
    torch.testing.assert_close(est.draw_log_probs(a, replace=True), a.log())


def test_sorting_by_position_biases_the_estimate():
    """Exact enumeration: the ATS estimate is unbiased in draw order and biased when sorted."""
    true_val, _, _ = true_value_and_grads()
    _, e_draw, _, _ = enumerate_expectation(est.expected_without_replacement, replace=False)
    _, e_sorted, _, _ = enumerate_expectation(
        est.expected_without_replacement, replace=False, order=lambda s: tuple(sorted(s))
    )
    torch.testing.assert_close(e_draw, true_val, rtol=0, atol=1e-12)
    assert (e_sorted - true_val).abs().max() > 0.05


def test_gumbel_top_k_matches_sequential_draw_probabilities():
    a = attention_from(THETA).float()
    m = 40_000
    g = torch.Generator().manual_seed(1234)
    idx = gumbel_top_k(a.expand(m, K), N, g)
    counts = Counter(map(tuple, idx.tolist()))
    assert all(len(set(s)) == N for s in counts)  # never a repeated position
    worst = 0.0
    for s in itertools.permutations(range(K), N):
        exact = draw_probability(attention_from(THETA), s, replace=False)
        worst = max(worst, abs(counts.get(s, 0) / m - exact))
    assert worst < 0.006  # per-draw sd ≤ 0.0016 at m = 40k; exact probabilities up to ~0.1
    # First draw is distributed as a itself.
    first = torch.bincount(idx[:, 0], minlength=K).double() / m
    torch.testing.assert_close(first, attention_from(THETA), rtol=0, atol=0.01)


def test_gumbel_top_k_rejects_too_many_and_respects_generator():
    a = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError):
        gumbel_top_k(a, 5)
    i1 = gumbel_top_k(a, 3, torch.Generator().manual_seed(7))
    i2 = gumbel_top_k(a, 3, torch.Generator().manual_seed(7))
    assert torch.equal(i1, i2)


def test_sampling_order_is_kept():
    """With a peaked attention the first returned index is the peak ~90% of the time; sorted by
    position it could only come first when positions 0 and 1 were not drawn."""
    a = torch.tensor([0.03, 0.03, 0.88, 0.03, 0.03])
    m = 20_000
    idx = gumbel_top_k(a.expand(m, K), 3, torch.Generator().manual_seed(0))
    first_is_peak = (idx[:, 0] == 2).double().mean().item()
    assert first_is_peak == pytest.approx(0.88, abs=0.015)
    sorted_first_is_peak = (idx.sort(dim=1).values[:, 0] == 2).double().mean().item()
    assert sorted_first_is_peak < 0.3
    assert not bool((idx.diff(dim=1) > 0).all(dim=1).all())  # not returned in position order


@pytest.mark.parametrize("replace", [False, True])
def test_reinforce_gradient_unbiased_by_enumeration(replace):
    """E[∇ reinforce loss] = −∇ E[r] for any reward; the baseline does not bias it."""
    reward_of = {k: float(r) for k, r in enumerate([0.2, 1.0, -0.5, 0.0, 0.7])}

    def reward(s):  # a reward of the ordered draw: last draw's value plus first draw's
        return reward_of[s[-1]] + 0.5 * reward_of[s[0]]

    a0 = attention_from(THETA)
    # exact ∇ E[r]
    theta = THETA.clone().requires_grad_()
    a = attention_from(theta)
    exp_r = sum(reward(s) * _prob_tensor(a, s, replace) for s in all_draws(replace))
    (true_grad,) = torch.autograd.grad(exp_r, theta)
    e_grad = 0.0
    for s in all_draws(replace):
        theta = THETA.clone().requires_grad_()
        a = attention_from(theta)
        sa = a[torch.tensor(s)][None]
        loss = est.reinforce_attention_loss(
            est.draw_log_probs(sa, replace), torch.tensor([reward(s)], dtype=DT), baseline=0.37
        )
        (g,) = torch.autograd.grad(loss, theta)
        e_grad = e_grad + draw_probability(a0, s, replace) * g
    torch.testing.assert_close(e_grad, -true_grad, rtol=0, atol=1e-10)


def _prob_tensor(a, s, replace):
    p, used = 1.0, 0.0
    for k in s:
        p = p * (a[k] if replace else a[k] / (1.0 - used))
        used = used + a[k]
    return p


def test_reinforce_loss_value_and_entropy_term():
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.1, 0.2]], dtype=DT))
    reward = torch.tensor([1.0, 0.0], dtype=DT)
    att = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]], dtype=DT)
    loss = est.reinforce_attention_loss(logp, reward, 0.25, att, entropy_weight=0.1)
    pg = -((0.75 * (torch.log(torch.tensor(0.125)))) + (-0.25 * torch.log(torch.tensor(0.02)))) / 2
    ent = (
        2 * 0.5 * torch.log(torch.tensor(0.5))
        + 2 * 0.25 * torch.log(torch.tensor(0.25))
        + 0.5 * torch.log(torch.tensor(0.5))
    ) / 2
    assert float(loss) == pytest.approx(float(pg + 0.1 * ent), abs=1e-6)
    assert torch.isfinite(est.attention_negentropy(att)).all()  # 0 log 0 = 0


def test_entropy_gradient_is_finite_where_attention_is_masked_to_zero():
    """Attention masked outside the slide is exactly 0 there; the entropy term must not turn
    the whole gradient into NaN (d(a log a)/d(log-space) at a = 0)."""
    theta = torch.tensor([0.3, -0.2, 1.0, 0.5], dtype=DT, requires_grad=True)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=DT)
    masked = theta.softmax(0) * mask
    att = (masked / masked.sum())[None]
    est.attention_negentropy(att).sum().backward()
    assert torch.isfinite(theta.grad).all() and abs(float(theta.grad[2])) < 1e-12
    a = att[0, [0, 1, 3]]
    assert float(est.attention_negentropy(att)) == pytest.approx(float((a * a.log()).sum()))


def test_entropy_regulariser_spreads_attention():
    theta = torch.tensor([2.0, 0.0, 0.0, 0.0], requires_grad=True)
    opt = est.make_attention_optimizer([theta], lr=0.05)
    h0 = -float(est.attention_negentropy(theta.softmax(0)[None]))
    for _ in range(20):
        a = theta.softmax(0)[None]
        loss = est.reinforce_attention_loss(
            torch.zeros(1, 1), torch.zeros(1), 0.0, a, entropy_weight=1.0
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert -float(est.attention_negentropy(theta.softmax(0)[None])) > h0 + 0.05


def test_attention_optimizer_is_the_talks_adam():
    opt = est.make_attention_optimizer([torch.zeros(2, requires_grad=True)])
    assert opt.defaults["lr"] == 1e-3
    assert opt.defaults["betas"] == (0.999, 0.999)


def test_ema_baseline():
    b = est.EMABaseline(decay=0.9)
    assert float(b) == 0.0 and b.value is None
    assert b.update(torch.tensor([1.0, 0.0])) == pytest.approx(0.5)
    assert b.update(1.5) == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)
    with pytest.raises(ValueError):
        est.EMABaseline(decay=1.0)


@pytest.mark.parametrize("replace", [False, True])
def test_reinforce_moves_attention_to_rewarded_position(replace):
    """Reward 1 when position 5 is among the draws: within 40 steps of the talk's optimizer
    (Adam, lr 1e-3, betas (0.999, 0.999)) its probability rises and becomes the largest."""
    g = torch.Generator().manual_seed(0)
    k, n, batch, target = 8, 2, 16, 5
    theta = torch.zeros(k, requires_grad=True)
    opt = est.make_attention_optimizer([theta])
    baseline = est.EMABaseline(0.9)
    for _ in range(40):
        a = theta.softmax(0).expand(batch, k)
        with torch.no_grad():
            idx = torch.multinomial(a, n, True, generator=g) if replace else gumbel_top_k(a, n, g)
        r = (idx == target).any(dim=1).float()
        ref.reinforce_step(opt, est.draw_log_probs(a.gather(1, idx), replace), r, baseline, a, 1e-3)
    p = theta.softmax(0).detach()
    assert int(p.argmax()) == target
    assert float(p[target]) > 1.03 / k
    assert baseline.value is not None and 0.0 < baseline.value < 1.0


def test_shape_validation():
    with pytest.raises(ValueError):
        est.expected_without_replacement(
            torch.zeros(2, 3, 4), torch.full((2, 3), 0.1), torch.zeros(4)
        )
    with pytest.raises(ValueError):
        est.expected_without_replacement(torch.zeros(2, 3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        est.expected_with_replacement(torch.zeros(2, 3, 4), torch.zeros(2, 3, 1))
