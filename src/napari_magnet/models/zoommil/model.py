"""The ZoomMIL module: gated-attention MIL that learns which patches to zoom into (DESIGN §9).

Thandiackal et al., *Differentiable Zooming for Multiple Instance Learning on Whole-Slide
Images*, ECCV 2022.

Per magnification ``m`` (coarsest first) the bag's features ``x_m`` (``(n_m, D)``) are
projected (Linear → ReLU → Dropout) to ``h_m``; a gated attention head
``a = softmax(w·(tanh(V h) ⊙ sigmoid(U h)))`` pools them into ``g_m = Σ a_i h_i``; a separate
scoring head of the same gated form (unnormalised) chooses the ``K_m = min(k[m], n_m)``
patches to zoom into, and the next bag is their children at ``m + 1`` (``c = r²`` each, in the
stored order). The slide is ``g_1 + … + g_M`` → one Linear classifier. One magnification
and no zoom step is ABMIL.

Selection
---------
* Evaluation (or no generator): the hard top-K; ``children`` is asked **only** for the
  selected patches, so only they need features (what makes inference cheap).
* Training (``model.training`` and a generator): the perturbed top-K (:mod:`.topk`) gives a
  soft indicator ``S`` (``(K, n)``); the next bag is ``einsum("kn,ncd->kcd", S, C)`` (index
  arithmetic, never a Kronecker product). A bag after the first is a soft mixture, so for a
  further zoom step ``children`` is asked for the children of **every** patch the mixture
  draws on (the whole level at ``m = 0``, all the children of those at ``m = 1`` …) and the
  mixing weights are carried along (``(K, P)``, ``P`` the patches mixed): the gradient
  reaches every scoring head through every later bag.

Indices: at magnification ``m`` patches are numbered globally as in the bag files — the
children of patch ``p`` are ``p · c + arange(c)`` at ``m + 1``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .config import ZoomMILConfig
from .topk import hard_topk, perturbed_topk

__all__ = [
    "GatedAttention",
    "SlideFlops",
    "ZoomLevel",
    "ZoomMIL",
    "ZoomOutput",
    "bag_sizes",
    "encoder_flops_per_patch",
    "encoder_mismatch",
    "slide_flops",
]

#: ``children(m, members) -> (len(members), c, D)``: features of the children at ``m + 1``.
Children = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class ZoomLevel:
    """What the model did at one magnification.

    Attributes
    ----------
    members : Tensor
        ``(n_m,)`` int64 global indices at this magnification of the bag's patches
        (``arange(N0)`` at the first; in training, the children of the hard-selected patches
        of the previous magnification — the soft bag's rows, for display and ids only).
    attention : Tensor
        ``(n_m,)`` gated-attention weights (softmax over the bag).
    scores : Tensor or None
        ``(n_m,)`` unnormalised selection scores; ``None`` at the last magnification.
    selected : Tensor or None
        ``(K_m,)`` positions in this bag of the hard top-K, by descending score; ``None`` at
        the last magnification.
    pooled : Tensor
        ``(hidden,)`` the attention-pooled feature ``g_m``.
    """

    members: Tensor
    attention: Tensor
    scores: Tensor | None
    selected: Tensor | None
    pooled: Tensor


@dataclass(frozen=True)
class ZoomOutput:
    """``logits`` ``(1, n_classes)`` and one :class:`ZoomLevel` per magnification."""

    logits: Tensor
    levels: tuple[ZoomLevel, ...]


class GatedAttention(nn.Module):
    """``w·(tanh(V h) ⊙ sigmoid(U h))``: one unnormalised score per row of ``h``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:  # noqa: D102
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)


def _build_encoder(name: str, dim: int, warn: bool):
    from ...bags.encoders import RandomFeaturesWarning, build_encoder

    with warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore", RandomFeaturesWarning)
        encoder = build_encoder(name)
    if encoder.dim != dim:
        raise ValueError(
            f"encoder {name!r} gives {encoder.dim}-d features; the config says feature_dim={dim}"
        )
    return encoder


def encoder_mismatch(
    attrs: Mapping[str, Any], encoder: str, encoder_config: Mapping[str, Any]
) -> str | None:
    """Why stored features did not come from a model's encoder, or ``None`` when they did.

    Parameters
    ----------
    attrs : mapping
        The ``features`` dataset's attributes as ``napari-magnet embed`` writes them
        (``encoder``, ``config``: the encoder's configuration as JSON).
    encoder : str
        The model's encoder name (``config.encoder``).
    encoder_config : mapping
        The model's ``encoder_config`` (weights hash, seed …).

    Returns
    -------
    str or None
        E.g. ``"made with encoder 'x'; the model uses 'y'"``.
    """
    theirs = attrs.get("encoder")
    if theirs != encoder:
        return f"made with encoder {theirs!r}; the model uses {encoder!r}"
    try:
        stored = json.loads(str(attrs.get("config") or "null"))
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict):
        return f"made with encoder {theirs!r}, but its configuration is not recorded"
    if any(stored.get(key) != encoder_config.get(key) for key in ("weights_sha256", "seed")):
        return (
            f"made with other weights of encoder {theirs!r} ({_weights_text(stored)}) than "
            f"the model's ({_weights_text(encoder_config)})"
        )
    return None


def _weights_text(config: Mapping[str, Any]) -> str:
    sha = config.get("weights_sha256")
    return f"weights sha256 {sha[:12]}…" if sha else f"random weights, seed {config.get('seed')}"


class ZoomMIL(nn.Module):
    """ZoomMIL over patch embeddings (see the module notes).

    Parameters
    ----------
    config : ZoomMILConfig, optional
        The hyper-parameters (default: the ``"zoommil"`` configuration).
    warn_random_encoder : bool
        Let :func:`~napari_magnet.bags.encoders.build_encoder` warn when the encoder has no
        weights of its own; off when a checkpoint's state dict supplies them.

    Attributes
    ----------
    encoder : nn.Module
        The frozen patch encoder: ``(B, 3, H, W)`` uint8 → ``(B, D)``; always in eval mode,
        no gradients, part of the state dict.
    encoder_config : dict
        What made the encoder (name, weights hash, seed …: ``Encoder.config``), to tell
        whether stored features came from it.
    """

    #: Architecture name recorded in checkpoints (see :mod:`..checkpoints`).
    architecture: ClassVar[str] = "zoommil"

    def __init__(
        self, config: ZoomMILConfig | None = None, *, warn_random_encoder: bool = True
    ) -> None:
        super().__init__()
        config = config or ZoomMILConfig()
        self.config = config
        warn = warn_random_encoder and config.encoder_weights is None
        encoder = _build_encoder(config.encoder, config.feature_dim, warn)
        self.encoder = encoder.module.requires_grad_(False).eval()
        self.encoder_config = dict(encoder.config)
        if config.encoder_weights is not None:  # the state dict to be loaded carries them
            self.encoder_config.update(weights_sha256=config.encoder_weights, seed=None)
        d, hidden, att = config.feature_dim, config.hidden, config.attention_hidden
        steps = config.steps
        self.project = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(config.dropout))
            for _ in range(steps)
        )
        self.attend = nn.ModuleList(GatedAttention(hidden, att) for _ in range(steps))
        self.score = nn.ModuleList(GatedAttention(hidden, att) for _ in range(steps - 1))
        self.classifier = nn.Linear(hidden, config.n_classes)

    def load_encoder_weights(self, path: str | os.PathLike) -> None:
        """Give the encoder the weights of ``path`` (the file the bags were embedded with);
        the model's config then records the file's SHA-256.

        Raises
        ------
        EncoderError
            The file is missing or does not fit the encoder.
        """
        from ...bags.encoders import build_encoder

        device = next(self.encoder.parameters()).device
        encoder = build_encoder(self.config.encoder, path, device=device)
        if encoder.dim != self.config.feature_dim:
            raise ValueError(
                f"{path}: the encoder gives {encoder.dim}-d features, the model expects "
                f"{self.config.feature_dim}"
            )
        self.encoder = encoder.module.requires_grad_(False).eval()
        self.encoder_config = dict(encoder.config)
        self.config = dataclasses.replace(self.config, encoder_weights=encoder.weights_sha256)

    def train(self, mode: bool = True) -> ZoomMIL:
        """Set the heads' mode; the encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(
        self, first: Tensor, children: Children, generator: torch.Generator | None = None
    ) -> ZoomOutput:
        """Classify one slide (see :meth:`zoom`, which this drains)."""
        stream = self.zoom(first, children, generator)
        while True:
            try:
                next(stream)
            except StopIteration as stop:
                return stop.value

    def zoom(
        self, first: Tensor, children: Children, generator: torch.Generator | None = None
    ) -> Generator[ZoomLevel, None, ZoomOutput]:
        """Classify one slide, yielding each magnification as soon as it is computed.

        Parameters
        ----------
        first : Tensor
            ``(N0, D)`` features of the first magnification's bag, in order.
        children : callable
            ``children(m, members)`` → ``(len(members), c, D)`` features of the children at
            ``m + 1`` of the given int64 global indices at ``m`` (child order as stored).
            Called after magnification ``m`` is yielded: with the selected patches only in
            evaluation, with every patch the soft bag mixes in training.
        generator : torch.Generator, optional
            With the model in training mode: the perturbed top-K's noise (soft selection).

        Yields
        ------
        ZoomLevel
            One per magnification, coarsest first.

        Returns
        -------
        ZoomOutput
        """
        cfg = self.config
        soft = self.training and generator is not None
        weight = self.classifier.weight
        x = first.to(device=weight.device, dtype=weight.dtype)
        if x.dim() != 2 or x.shape[1] != cfg.feature_dim or len(x) == 0:
            raise ValueError(
                f"first must be (N0 ≥ 1, {cfg.feature_dim}) features, got {tuple(first.shape)}"
            )
        members = torch.arange(len(x), device=weight.device)
        pool, mix = members, None  # training: the patches the soft bag mixes, and how
        levels: list[ZoomLevel] = []
        total = torch.zeros(cfg.hidden, device=weight.device, dtype=weight.dtype)
        for m in range(cfg.steps):
            h = self.project[m](x)
            attention = torch.softmax(self.attend[m](h), dim=0)
            pooled = (attention[None] @ h)[0]
            total = total + pooled
            if m == cfg.steps - 1:
                levels.append(ZoomLevel(members, attention, None, None, pooled))
                yield levels[-1]
                break
            scores = self.score[m](h)
            k = min(cfg.k[m], len(x))
            selected = hard_topk(scores, k)
            levels.append(ZoomLevel(members, attention, scores, selected, pooled))
            yield levels[-1]
            c = cfg.fan_out(m) ** 2
            offsets = torch.arange(c, device=weight.device)
            if soft:
                s = perturbed_topk(scores, k, cfg.sigma, cfg.samples, generator)
                if mix is not None:  # rows of this bag are (previous row a, child j)
                    s = torch.einsum("kaj,ap->kpj", s.view(k, mix.shape[0], -1), mix)
                    s = s.reshape(k, -1)
                feats = self._children(children, m, pool, c)
                x = torch.einsum("kp,pcd->kcd", s.to(feats.dtype), feats).reshape(k * c, -1)
                pool, mix = (pool[:, None] * c + offsets).reshape(-1), s
            else:
                x = self._children(children, m, members[selected], c).reshape(k * c, -1)
            members = (members[selected][:, None] * c + offsets).reshape(-1)
        logits = self.classifier(total[None])
        return ZoomOutput(logits, tuple(levels))

    def _children(self, children: Children, m: int, members: Tensor, c: int) -> Tensor:
        feats = children(m, members)
        d = self.config.feature_dim
        if tuple(feats.shape) != (len(members), c, d):
            raise ValueError(
                f"children({m}, …) must return ({len(members)}, {c}, {d}) features, "
                f"got {tuple(feats.shape)}"
            )
        weight = self.classifier.weight
        return feats.to(device=weight.device, dtype=weight.dtype)


def bag_sizes(config: ZoomMILConfig, n_first: int) -> tuple[int, ...]:
    """Patches embedded per magnification by an evaluation run whose first bag has
    ``n_first`` patches: ``N0``, then ``min(k[m], n_m) · c_m`` at each zoom step."""
    sizes = [int(n_first)]
    for m in range(config.steps - 1):
        sizes.append(min(config.k[m], sizes[-1]) * config.fan_out(m) ** 2)
    return tuple(sizes)


@dataclass(frozen=True)
class SlideFlops:
    """Floating-point operations of one slide (multiply-add = 2, as FlopCounterMode counts).

    Attributes
    ----------
    patches : tuple of int
        Patches embedded per magnification.
    encoder_per_patch : int
        Encoder FLOPs for one patch.
    encoder : int
        ``encoder_per_patch × sum(patches)``.
    head : int
        Projections, attention, scoring and classifier over bags of those sizes.
    """

    patches: tuple[int, ...]
    encoder_per_patch: int
    encoder: int
    head: int

    @property
    def total(self) -> int:
        """Encoder plus head."""
        return self.encoder + self.head


def encoder_flops_per_patch(model: ZoomMIL) -> int:
    """FLOPs of the encoder on one ``patch_size`` patch (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model.config.patch_size
    device = next(model.encoder.parameters()).device
    patch = torch.zeros((1, 3, size, size), dtype=torch.uint8, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.encoder(patch)
    return int(counter.get_total_flops())


def slide_flops(model: ZoomMIL, patches: Sequence[int]) -> SlideFlops:
    """The FLOPs of classifying one slide whose bags have ``patches`` patches.

    Parameters
    ----------
    model : ZoomMIL
        The model (its encoder is measured once, for one patch, and multiplied).
    patches : sequence of int
        Patches embedded per magnification (e.g. :func:`bag_sizes`, or every patch of the
        nested grid for a model that would embed them all).
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    patches = tuple(int(n) for n in patches)
    if len(patches) != cfg.steps:
        raise ValueError(f"one count per magnification ({cfg.steps}) needed, got {patches}")
    per_patch = encoder_flops_per_patch(model)
    weight = model.classifier.weight
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        total = torch.zeros(cfg.hidden, device=weight.device)
        for m, n in enumerate(patches):
            h = model.project[m](torch.zeros((n, cfg.feature_dim), device=weight.device))
            attention = torch.softmax(model.attend[m](h), dim=0)
            total = total + (attention[None] @ h)[0]
            if m < cfg.steps - 1:
                model.score[m](h)
        model.classifier(total[None])
    return SlideFlops(patches, per_patch, per_patch * sum(patches), int(counter.get_total_flops()))
