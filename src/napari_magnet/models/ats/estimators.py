"""Expectation estimators for attention sampling, with unbiased gradients (DESIGN §5).

Attention sampling (Katharopoulos & Fleuret, ICML 2019) replaces the full attention-weighted
average of per-position features, ``E_a[f] = Σ_k a_k f_k``, by an estimate built from ``N``
positions ``s = (s_1, …, s_N)`` drawn from the attention distribution ``a``. The estimate must be
unbiased in its *value* and its *gradient* with respect to the attention, or the attention
network learns the wrong thing. This module builds both, as **surrogates**: tensors whose
forward value is exactly the estimate ``F̂`` and whose autograd gradient is an unbiased
estimate of ``∇ E[F̂] = ∇ Σ_k a_k f_k``.

Conventions
-----------
``features``
    ``(B, N, *D)`` — the features ``f_{s_i}`` of the sampled positions, **in draw order**
    (``features[:, 0]`` belongs to the first draw).
``sampled_attention``
    ``(B, N)`` — ``a_{s_i}``, the attention probability of each sampled position, gathered
    from the (differentiable) attention distribution; same order.
Feature dimensions ``*D`` may be anything (a vector of ``feature_dim`` in the model).

With replacement
----------------
``F̂ = (1/N) Σ_i f_{s_i}`` with ``s_i`` i.i.d. ``~ a``: ``E[F̂] = Σ_k a_k f_k``. Its value does not
involve ``a``, so the gradient to the attention is the score function:
``∇ E[F̂] = E[(1/N) Σ_i f_{s_i} ∇ log a_{s_i}]`` — the paper's "``f_i / a_i``" rule
(``f_i ∇a_i / a_i``). Surrogate: ``(1/N) Σ_i f_i + (f_i − b)(log a_i − ⊥log a_i)`` where ``⊥`` is
stop-gradient; its value is ``F̂`` exactly (``x − x = 0``).

Without replacement (the ATS estimator)
---------------------------------------
Draws are sequential: ``s_i ~ a`` restricted to the positions not yet drawn, i.e. with
probability ``q_i = a_{s_i} / (1 − S_i)`` where ``S_i = Σ_{j<i} a_{s_j}``. The estimator

    ``F_i = Σ_{j<i} a_{s_j} f_{s_j} + (1 − S_i) f_{s_i}``,      ``F̂ = (1/N) Σ_i F_i``

is unbiased for every ``i``: conditioned on the first ``i − 1`` draws,
``E[(1 − S_i) f_{s_i}] = Σ_{k not drawn} a_k f_k``. This needs the samples **in draw order**;
sorting them (e.g. by position) breaks the conditional argument and biases ``F̂``.

The gradient. ``F̂`` depends on the attention in two ways: directly, through the weights
``a_{s_j}`` and ``1 − S_i`` (the *pathwise* part), and through the distribution of ``s``. The
published TensorFlow custom gradient (``ats/core/expectation.py``,
``_expected_without_replacement``) replaces the second part by a heuristic and is biased in
expectation; so is simply back-propagating through the weights (pathwise only). The exact
identity is the log-derivative trick on the ordered draw:

    ``∇ E[F_i] = E[ ∇F_i + F_i ∇ log P(s_1..s_i) ]``,
    ``P(s_1..s_i) = Π_{m≤i} a_{s_m} / (1 − Σ_{j<m} a_{s_j})``.

``F_i`` depends only on the first ``i`` draws, so later draws' score terms (mean zero given the
past) are dropped — a variance reduction that keeps unbiasedness. A baseline ``b`` that does
not depend on the current draw can be subtracted from ``F_i`` in the score term, because
``E[∇ log P(s_1..s_i)] = Σ_s ∇P(s) = ∇1 = 0``. Surrogate:

    ``F̂_sur = (1/N) Σ_i [ F_i + (⊥F_i − b) (L_i − ⊥L_i) ]``,    ``L_i = log P(s_1..s_i)``.

Its value is ``F̂`` and ``∇F̂_sur = ∇F̂ + (1/N) Σ_i (F_i − b) ∇L_i``, whose expectation is
``∇ Σ_k a_k f_k``; the test suite checks this by exact enumeration of every ordered draw.

Vector features and a downstream loss. For vector ``F̂`` the surrogate gives, for every upstream
gradient ``v``, an unbiased estimate of ``vᵀ J`` with ``J`` the Jacobian of ``E[F̂]`` — exactly what
the paper's custom gradients provide. A loss ``ℓ(F̂)`` that is linear in ``F̂`` (the classifier's
logits are) therefore gets an unbiased gradient; through a nonlinear loss the chain rule
evaluates ``∂ℓ/∂F̂`` at the sample, as in the paper.

REINFORCE (the talk's variant)
------------------------------
:func:`reinforce_attention_loss` is ``−(r − b) log P(s) + λ Σ_k a_k log a_k`` with ``b`` a running
(exponential moving average) baseline of the reward and ``λ`` the entropy-regularisation weight
(the term is ``−λ·H(a)``, so minimising it keeps the attention spread out).
:class:`~napari_magnet.models.ats.ATSTask` trains a model that way with two Adam optimizers
(lr 1e-3; the attention optimizer's first-moment decay 0.999, :func:`make_attention_optimizer`).

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = [
    "ats_terms",
    "draw_log_probs",
    "sequence_log_prob",
    "expected_with_replacement",
    "expected_without_replacement",
    "expectation",
    "reinforce_attention_loss",
    "attention_negentropy",
    "EMABaseline",
    "make_attention_optimizer",
]

_TINY = 1e-30


def _expand(x: Tensor, like: Tensor) -> Tensor:
    """Append singleton dims to ``x`` (B, N) so it broadcasts against ``like`` (B, N, *D)."""
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def _check(features: Tensor, sampled_attention: Tensor) -> None:
    if sampled_attention.dim() != 2:
        raise ValueError(f"sampled_attention must be (B, N), got {tuple(sampled_attention.shape)}")
    if features.dim() < 2 or features.shape[:2] != sampled_attention.shape:
        raise ValueError(
            f"features must be (B, N, ...) matching sampled_attention {tuple(sampled_attention.shape)}, "
            f"got {tuple(features.shape)}"
        )


def _remaining_mass(sampled_attention: Tensor) -> Tensor:
    """``1 − S_i`` with ``S_i = Σ_{j<i} a_{s_j}`` (exclusive cumulative sum), clamped at 0."""
    exclusive = torch.cumsum(sampled_attention, dim=1) - sampled_attention
    return (1.0 - exclusive).clamp_min(0.0)


def ats_terms(features: Tensor, sampled_attention: Tensor) -> Tensor:
    """The per-draw ATS estimates ``F_i = Σ_{j<i} a_j f_j + (1 − Σ_{j<i} a_j) f_i``.

    Parameters
    ----------
    features : Tensor
        ``(B, N, *D)`` features of the sampled positions in draw order.
    sampled_attention : Tensor
        ``(B, N)`` attention probability of each sampled position.

    Returns
    -------
    Tensor
        ``(B, N, *D)``; each ``F_i`` is on its own an unbiased estimate of ``Σ_k a_k f_k``
        (when the samples are in draw order). Differentiable through the weights only.
    """
    _check(features, sampled_attention)
    a = _expand(sampled_attention, features)
    weighted = a * features
    before = torch.cumsum(weighted, dim=1) - weighted  # exclusive cumsum of a_j f_j
    return before + _expand(_remaining_mass(sampled_attention), features) * features


def draw_log_probs(sampled_attention: Tensor, replace: bool) -> Tensor:
    """Log-probability of each draw given the previous ones.

    With replacement ``log a_{s_i}``; without replacement
    ``log a_{s_i} − log(1 − Σ_{j<i} a_{s_j})``. Summed over ``i`` this is ``log P(s)``, the
    log-probability of the whole ordered draw.

    Parameters
    ----------
    sampled_attention : Tensor
        ``(B, N)`` attention probability of each draw, in draw order.
    replace : bool
        Whether the draws were made with replacement.

    Returns
    -------
    Tensor
        ``(B, N)``, differentiable w.r.t. the attention.
    """
    log_a = sampled_attention.clamp_min(_TINY).log()
    if replace:
        return log_a
    return log_a - _remaining_mass(sampled_attention).clamp_min(_TINY).log()


def sequence_log_prob(sampled_attention: Tensor, replace: bool) -> Tensor:
    """``log P(s)`` of the ordered draw; see :func:`draw_log_probs`.

    Parameters
    ----------
    sampled_attention : Tensor
        ``(B, N)`` attention probability of each draw, in draw order.
    replace : bool
        Whether the draws were made with replacement.

    Returns
    -------
    Tensor
        ``(B,)``.
    """
    return draw_log_probs(sampled_attention, replace).sum(dim=1)


def _baseline_like(baseline: Tensor | float | None, target: Tensor) -> Tensor | float:
    """Detach ``baseline`` and shape it to broadcast against ``target`` (B, N, *D).

    Accepted: ``None``/float/0-d tensor (one value), ``(B,)`` (one value per batch row) or
    ``(B, *D)`` (per row and feature). A per-feature ``(*D)`` baseline must be expanded to
    ``(B, *D)`` by the caller (it would be ambiguous with ``(B,)``).
    """
    if baseline is None:
        return 0.0
    if not isinstance(baseline, Tensor):
        return float(baseline)
    b = baseline.detach().to(dtype=target.dtype, device=target.device)
    if b.dim() == 0:
        return b
    bsz = target.shape[0]
    if b.dim() == 1 and b.shape[0] == bsz:
        return b.reshape((bsz,) + (1,) * (target.dim() - 1))
    if b.dim() == target.dim() - 1 and b.shape[0] == bsz and b.shape[1:] == target.shape[2:]:
        return b.unsqueeze(1)
    raise ValueError(
        f"baseline must be a scalar, (B,) or (B, *D) for features {tuple(target.shape)}, "
        f"got {tuple(b.shape)}"
    )


def expected_with_replacement(
    features: Tensor, sampled_attention: Tensor, baseline: Tensor | float | None = None
) -> Tensor:
    """Surrogate of ``F̂ = mean_i f_i`` for i.i.d. draws (with replacement).

    The value is the plain mean. The gradient to the attention is
    ``(1/N) Σ_i (f_i − b) ∇ log a_i`` — the paper's ``f_i · a_i / ⊥a_i`` rule (with an optional
    baseline ``b``, which leaves it unbiased); the gradient to the features is the mean's.

    Parameters
    ----------
    features : Tensor
        ``(B, N, *D)``.
    sampled_attention : Tensor
        ``(B, N)`` probabilities ``a_{s_i}``; must carry the graph to the attention network.
    baseline : Tensor or float, optional
        Anything independent of the current draw: a scalar, ``(B,)`` or ``(B, *D)``.
        It is detached. Lowers the variance, not the mean.

    Returns
    -------
    Tensor
        ``(B, *D)`` with forward value ``features.mean(1)``.
    """
    _check(features, sampled_attention)
    log_a = draw_log_probs(sampled_attention, replace=True)
    score = _expand(log_a - log_a.detach(), features)  # value 0, gradient ∇ log a_i
    centred = features.detach() - _baseline_like(baseline, features)
    return (features + centred * score).mean(dim=1)


def expected_without_replacement(
    features: Tensor, sampled_attention: Tensor, baseline: Tensor | float | None = None
) -> Tensor:
    """Surrogate of the ATS estimator for draws without replacement, with unbiased gradients.

    Value: ``F̂ = (1/N) Σ_i F_i`` (:func:`ats_terms`). Gradient:
    ``∇F̂ + (1/N) Σ_i (F_i − b) ∇ log P(s_1..s_i)`` — pathwise plus the causal score-function
    term; its expectation is the true ``∇ Σ_k a_k f_k`` (see the module docstring).

    Parameters
    ----------
    features : Tensor
        ``(B, N, *D)`` in draw order (never sorted).
    sampled_attention : Tensor
        ``(B, N)`` probabilities of the sampled positions, same order, differentiable.
    baseline : Tensor or float, optional
        Independent of the current draw (e.g. a running mean of ``F̂``): a scalar, ``(B,)`` or
        ``(B, *D)``; detached.

    Returns
    -------
    Tensor
        ``(B, *D)`` whose value equals the ATS estimate.
    """
    terms = ats_terms(features, sampled_attention)
    prefix_logp = torch.cumsum(draw_log_probs(sampled_attention, replace=False), dim=1)
    score = _expand(prefix_logp - prefix_logp.detach(), features)
    centred = terms.detach() - _baseline_like(baseline, terms)
    return (terms + centred * score).mean(dim=1)


def expectation(
    features: Tensor,
    sampled_attention: Tensor,
    replace: bool,
    baseline: Tensor | float | None = None,
) -> Tensor:
    """Dispatch to :func:`expected_with_replacement` or :func:`expected_without_replacement`.

    Parameters
    ----------
    features : Tensor
        ``(B, N, *D)`` features of the draws, in draw order.
    sampled_attention : Tensor
        ``(B, N)`` their attention probabilities, differentiable.
    replace : bool
        Whether the draws were made with replacement.
    baseline : Tensor or float, optional
        Score-function baseline (see the two estimators).

    Returns
    -------
    Tensor
        ``(B, *D)`` surrogate whose value is the estimate.
    """
    if replace:
        return expected_with_replacement(features, sampled_attention, baseline)
    return expected_without_replacement(features, sampled_attention, baseline)


# --------------------------------------------------------------------------------------------
# REINFORCE with a running baseline and entropy regularisation (the talk's variant).
# --------------------------------------------------------------------------------------------


def attention_negentropy(attention: Tensor) -> Tensor:
    """``Σ_k a_k log a_k`` per batch row (``0 log 0 = 0``).

    Positions with ``a_k = 0`` (masked outside the slide) contribute 0 and a finite gradient;
    ``xlogy`` would give them a NaN gradient (``0 / 0``).

    Parameters
    ----------
    attention : Tensor
        ``(B, ...)`` distributions.

    Returns
    -------
    Tensor
        ``(B,)`` negative entropies.
    """
    flat = attention.flatten(1)
    return (flat * flat.clamp_min(torch.finfo(flat.dtype).tiny).log()).sum(dim=1)


def reinforce_attention_loss(
    log_probs: Tensor,
    reward: Tensor,
    baseline: Tensor | float,
    attention: Tensor | None = None,
    entropy_weight: float = 0.0,
) -> Tensor:
    """REINFORCE loss for the attention: ``mean_b[ −(r − b) log P(s) + λ Σ_k a_k log a_k ]``.

    Parameters
    ----------
    log_probs : Tensor
        ``(B, N)`` per-draw log-probabilities of the sampled positions (:func:`draw_log_probs`)
        or ``(B,)`` already summed; differentiable w.r.t. the attention parameters.
    reward : Tensor
        ``(B,)`` reward of each sample (detached here).
    baseline : Tensor or float
        Running baseline (detached here), e.g. :attr:`EMABaseline.value`.
    attention : Tensor, optional
        ``(B, ...)`` full attention distribution for the entropy term.
    entropy_weight : float
        ``λ``; the term ``λ Σ a log a = −λ H(a)`` rewards spread-out attention.

    Returns
    -------
    Tensor
        Scalar loss; its gradient is an unbiased estimate of ``−∇ E[r]`` (plus the entropy term).
    """
    logp = log_probs.sum(dim=1) if log_probs.dim() == 2 else log_probs
    if isinstance(baseline, Tensor):
        baseline = baseline.detach()
    advantage = (reward.detach() - baseline).to(logp.dtype)
    loss = -(advantage * logp).mean()
    if attention is not None and entropy_weight:
        loss = loss + entropy_weight * attention_negentropy(attention).mean()
    return loss


class EMABaseline:
    """Running reward baseline ``b ← β b + (1 − β) mean(r)``; starts at the first reward.

    Parameters
    ----------
    decay : float
        ``β`` in ``[0, 1)``.
    initial : float, optional
        Starting value; ``None`` until the first reward.
    """

    def __init__(self, decay: float = 0.9, initial: float | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        self.decay = float(decay)
        self.value: float | None = initial

    def update(self, reward: Tensor | float) -> float:
        """Fold the mean of ``reward`` into the baseline and return its new value."""
        r = float(reward.detach().float().mean()) if isinstance(reward, Tensor) else float(reward)
        self.value = r if self.value is None else self.decay * self.value + (1.0 - self.decay) * r
        return self.value

    def __float__(self) -> float:
        return 0.0 if self.value is None else self.value


def make_attention_optimizer(params: Iterable[Tensor], lr: float = 1e-3) -> torch.optim.Adam:
    """Adam for the attention parameters as in the talk: lr 1e-3, betas (0.999, 0.999).

    Parameters
    ----------
    params : iterable of Tensor
        The attention networks' parameters.
    lr : float
        Learning rate.

    Returns
    -------
    torch.optim.Adam
    """
    return torch.optim.Adam(params, lr=lr, betas=(0.999, 0.999))
