"""The perturbed top-K: its values, its limit, and its gradient against finite differences."""

from __future__ import annotations

import pytest
import torch

from napari_magnet.models.zoommil.topk import (
    hard_topk,
    hard_topk_indicator,
    perturbed_topk,
)

SCORES = torch.tensor([0.3, -0.1, 0.5, 0.0, 0.2], dtype=torch.float64)
#: A fixed incoming gradient G (K = 2 rows, n = 5 columns).
G = torch.tensor([[1.0, -0.5, 0.2, 0.8, -1.0], [0.3, 0.9, -0.7, 0.1, 0.4]], dtype=torch.float64)


def draws(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rows_are_distributions_and_columns_at_most_one():
    scores = torch.randn(40, generator=draws(0))
    soft = perturbed_topk(scores, 6, sigma=0.5, samples=300, generator=draws(1))
    assert soft.shape == (6, 40)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(6))
    assert (soft.sum(dim=0) <= 1 + 1e-6).all()
    assert (soft >= 0).all()
    # a mean of 300 one-hot vectors: multiples of 1/300, and the noise spreads the mass
    torch.testing.assert_close(soft * 300, (soft * 300).round())
    assert (soft > 0).sum() > 6


def test_same_generator_seed_same_draws():
    a = perturbed_topk(SCORES, 2, 0.5, 100, draws(3))
    b = perturbed_topk(SCORES, 2, 0.5, 100, draws(3))
    c = perturbed_topk(SCORES, 2, 0.5, 100, draws(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


def test_tends_to_the_hard_top_k_by_descending_score_as_sigma_vanishes():
    soft = perturbed_topk(SCORES, 3, sigma=1e-4, samples=50, generator=draws(0))
    hard = hard_topk_indicator(SCORES, 3)
    torch.testing.assert_close(soft, hard)
    # rows by descending score: 0.5 (position 2), 0.3 (0), 0.2 (4)
    assert hard_topk(SCORES, 3).tolist() == [2, 0, 4]
    assert soft.argmax(dim=1).tolist() == [2, 0, 4]
    # with more noise the indicator is no longer one-hot
    blurred = perturbed_topk(SCORES, 3, sigma=0.3, samples=500, generator=draws(0))
    assert blurred.max() < 1


def test_gradient_matches_finite_differences_of_the_smoothed_objective():
    """∂F/∂s of F(s) = E[⟨G, Y(s + σZ)⟩]: the backward pass against central differences
    with common random numbers (the same draws on both sides), on n = 5, K = 2."""
    sigma, samples, h = 0.5, 400_000, 0.1

    def smoothed(s: torch.Tensor) -> torch.Tensor:
        return (G * perturbed_topk(s, 2, sigma, samples, draws(7))).sum()

    scores = SCORES.clone().requires_grad_(True)
    objective = (G * perturbed_topk(scores, 2, sigma, samples, draws(11))).sum()
    (grad,) = torch.autograd.grad(objective, scores)
    eye = torch.eye(5, dtype=torch.float64)
    fd = torch.stack([(smoothed(SCORES + h * e) - smoothed(SCORES - h * e)) / (2 * h) for e in eye])
    # Each estimate has a standard error of about 0.005 per entry here; the gradient's
    # entries reach ±0.65, so a gradient off by a factor, a sign or a transposition fails.
    assert fd.abs().max() > 0.4
    torch.testing.assert_close(grad, fd, atol=0.04, rtol=0.0)
    # shifting every score alike changes no ranking: the entries sum to about 0
    assert abs(float(grad.sum())) < 0.04


def test_raising_a_borderline_score_raises_its_chance_of_selection():
    """G = 1 on patch 0 in every row: F is the probability that patch 0 is selected."""
    scores = SCORES.clone().float().requires_grad_(True)
    selected = perturbed_topk(scores, 2, 0.2, 20_000, draws(5))[:, 0].sum()
    (grad,) = torch.autograd.grad(selected, scores)
    assert grad.dtype == torch.float32
    assert 0.2 < float(selected.detach()) < 0.9  # 0.3 competes with 0.2 for the second place
    assert grad[0] > 0.5
    assert grad[4] < -0.3  # its rival for the second place
    assert grad[4] < grad[2] and grad[4] < grad[1]


@pytest.mark.parametrize(
    ("k", "sigma", "samples"), [(0, 0.1, 10), (6, 0.1, 10), (2, 0.0, 10), (2, 0.1, 0)]
)
def test_bad_arguments_are_refused(k, sigma, samples):
    with pytest.raises(ValueError):
        perturbed_topk(SCORES, k, sigma, samples)
