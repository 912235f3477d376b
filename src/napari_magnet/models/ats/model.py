"""The attention-sampling module: attention over a view, sampling, reading, the estimator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn

from .config import ATS_CONFIGS, ATSConfig
from .estimators import draw_log_probs, expectation
from .parts import (
    ATSOutput,
    AttentionNet,
    FeatureNet,
    _check_draws,
    _checked,
    _restricted,
    gumbel_top_k,
)

__all__ = [
    "ATSOutput",
    "AttentionNet",
    "AttentionSampling",
    "FeatureNet",
    "build_ats",
    "gumbel_top_k",
]


class AttentionSampling(nn.Module):
    """Attention-sampling classifier (DESIGN §5); see the module docstring for shapes.

    Parameters
    ----------
    config : ATSConfig
        The hyper-parameters; :meth:`config_hash` identifies checkpoints made with them.
    """

    #: Architecture name recorded in checkpoints (see :mod:`.checkpoints`).
    architecture: ClassVar[str] = "ats"

    def __init__(self, config: ATSConfig | None = None) -> None:
        super().__init__()
        config = config or ATSConfig()
        self.config = config
        self.attention_net = AttentionNet()
        # The second level looks at a finer scale than the view, so it gets its own network.
        self.region_attention_net = AttentionNet() if config.two_level else None
        self.feature_net = FeatureNet(config.feature_dim)
        self.classifier = nn.Linear(config.feature_dim, config.n_classes)
        self._last_view_shape: tuple[int, int] | None = None

    @classmethod
    def from_config(cls, config: ATSConfig | dict) -> AttentionSampling:
        """A fresh model for ``config`` (an :class:`ATSConfig` or its :meth:`~ATSConfig.to_dict`)."""
        return cls(config if isinstance(config, ATSConfig) else ATSConfig.from_dict(config))

    # -- parameter groups (two optimizers in REINFORCE training) ------------------------------
    def attention_parameters(self) -> Iterator[nn.Parameter]:
        """The attention networks' parameters (the view's and, two-level, the regions')."""
        yield from self.attention_net.parameters()
        if self.region_attention_net is not None:
            yield from self.region_attention_net.parameters()

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The feature network's and the classifier's parameters."""
        yield from self.feature_net.parameters()
        yield from self.classifier.parameters()

    # -- the pieces the engine calls ----------------------------------------------------------
    def attention(self, view: Tensor) -> Tensor:
        """The view's attention: a softmax over all positions, each map summing to 1.

        Computed in at least float32, mixed with the uniform distribution by ``config.epsilon``.

        Parameters
        ----------
        view : Tensor
            ``(B, 3, h, w)`` float RGB in ``[0, 1]``.

        Returns
        -------
        Tensor
            ``(B, h, w)``.
        """
        return self._distribution(self.attention_net, view)

    def region_attention(self, regions: Tensor) -> Tensor:
        """Two-level: the attention inside each region, as :meth:`attention` for the view.

        Parameters
        ----------
        regions : Tensor
            ``(M, 3, R, R)`` float RGB in ``[0, 1]``.

        Returns
        -------
        Tensor
            ``(M, R, R)``.
        """
        if self.region_attention_net is None:
            raise ValueError(f"{self.config.name} is a one-level model: it has no region attention")
        return self._distribution(self.region_attention_net, regions)

    def _distribution(self, net: nn.Module, view: Tensor) -> Tensor:
        if view.dim() != 4 or view.shape[1] != 3:
            raise ValueError(f"view must be (B, 3, h, w), got {tuple(view.shape)}")
        scores = net(view)
        b, h, w = scores.shape
        flat = scores.reshape(b, h * w)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        a = torch.softmax(flat, dim=1)
        eps = self.config.epsilon
        if eps > 0:
            a = (1.0 - eps) * a + eps / a.shape[1]
        return a.reshape(b, h, w)

    def sample(
        self,
        attention: Tensor,
        n: int,
        replace: bool,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` positions from ``attention (B, h', w')``.

        Returns
        -------
        indices : Tensor
            ``(B, n)`` int64 flat positions ``r * w' + c`` in sampling order.
        probabilities : Tensor
            ``(B, n)`` their attention values, differentiable w.r.t. the attention.

        ``generator`` must live on the attention's device (a CUDA generator for CUDA tensors).
        """
        flat = attention.reshape(attention.shape[0], -1)
        with torch.no_grad():
            p = flat.detach()
            if replace:
                p = p if p.dtype == torch.float64 else p.float()
                idx = torch.multinomial(p, n, replacement=True, generator=generator)
            else:
                idx = gumbel_top_k(p, n, generator)
        return idx, flat.gather(1, idx)

    @staticmethod
    def positions_to_centres(
        indices: Tensor, att_shape: tuple[int, int], view_shape: tuple[int, int] | None = None
    ) -> Tensor:
        """Flat positions → centres as view-normalised ``(x, y)`` in ``[0, 1]``.

        The attention grid ``(h', w')`` spans the view uniformly, so the centre of cell
        ``(r, c)`` is ``((c + 0.5) / w', (r + 0.5) / h')`` whatever the view's pixel size.

        Parameters
        ----------
        indices : Tensor
            ``(B, n)`` flat positions ``r * w' + c``.
        att_shape : tuple of int
            ``(h', w')`` of the attention grid.
        view_shape : tuple of int, optional
            ``(h, w)`` of the view, only checked (the grid may not be finer).

        Returns
        -------
        Tensor
            ``(B, n, 2)`` in the default dtype.
        """
        hp, wp = int(att_shape[0]), int(att_shape[1])
        if view_shape is not None:
            hv, wv = int(view_shape[0]), int(view_shape[1])
            if hv < hp or wv < wp:
                raise ValueError(f"attention grid {att_shape} is finer than the view {view_shape}")
        rows = torch.div(indices, wp, rounding_mode="floor")
        cols = indices - rows * wp
        dtype = torch.get_default_dtype()
        x = (cols.to(dtype) + 0.5) / wp
        y = (rows.to(dtype) + 0.5) / hp
        return torch.stack([x, y], dim=-1)

    def classify(
        self,
        patches: Tensor,
        attention: Tensor,
        indices: Tensor,
        *,
        replace: bool | None = None,
        baseline: Tensor | float | None = None,
        attention_grad: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Classify sampled patches.

        Parameters
        ----------
        patches : Tensor
            ``(B * n, 3, P, P)`` batch-major, in the order of ``indices``.
        attention : Tensor
            ``(B, h', w')`` the distribution the indices were drawn from.
        indices : Tensor
            ``(B, n)`` flat positions in sampling order.
        replace : bool, optional
            How the indices were drawn; defaults to ``config.replace``.
        baseline : Tensor or float, optional
            Score-function baseline for the estimator (no effect on the value or the bias).
        attention_grad : bool
            ``False`` detaches the attention (REINFORCE training learns it separately).

        Returns
        -------
        logits : Tensor
            ``(B, n_classes)`` = ``classifier(features)``.
        features : Tensor
            ``(B, feature_dim)`` surrogate of the attention-weighted mean feature: its value is
            the estimate ``F̂``, its gradient the unbiased one (:mod:`.estimators`). The classifier
            is linear, so the logits' gradient is unbiased too.
        """
        replace = self.config.replace if replace is None else replace
        b, n = indices.shape
        feats = self.feature_net(patches).reshape(b, n, -1)
        a = attention.reshape(b, -1).gather(1, indices)
        if not attention_grad:
            a = a.detach()
        features = expectation(feats, a.to(feats.dtype), replace, baseline)
        return self.classifier(features), features

    def classify_two_level(
        self,
        patches: Tensor,
        attention: Tensor,
        indices: Tensor,
        region_attention: Tensor,
        region_indices: Tensor,
        *,
        replace: bool | None = None,
        baseline: Tensor | float | None = None,
        attention_grad: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Classify the patches of a two-level draw with the nested expectation estimator.

        Each region's feature is estimated from its own ``N2`` patches and region attention;
        the slide feature is estimated from the ``N1`` region features and the view's attention.
        Both estimators are linear in what they average and the inner draws are independent
        given the regions, so the nested estimate, and its gradient, stay unbiased for
        ``Σ_k a_k Σ_j a'_{k,j} f_{k,j}`` (checked by exact enumeration in the tests).

        Parameters
        ----------
        patches : Tensor
            ``(B * N1 * N2, 3, P, P)``, region-major, each region's patches in sampling order.
        attention, indices : Tensor
            ``(B, h', w')`` view attention and the ``(B, N1)`` regions drawn from it.
        region_attention, region_indices : Tensor
            ``(B * N1, R', R')`` attention inside each region and the ``(B * N1, N2)`` patch
            positions drawn from it.
        replace, baseline, attention_grad
            As in :meth:`classify` (the baseline applies to the outer estimate).
        """
        replace = self.config.replace if replace is None else replace
        b, n1 = indices.shape
        m, n2 = region_indices.shape
        if m != b * n1:
            raise ValueError(f"{m} regions' patch draws for {b} × {n1} regions")
        feats = self.feature_net(patches).reshape(m, n2, -1)
        inner = region_attention.reshape(m, -1).gather(1, region_indices)
        outer = attention.reshape(b, -1).gather(1, indices)
        if not attention_grad:
            inner, outer = inner.detach(), outer.detach()
        region_features = expectation(feats, inner.to(feats.dtype), replace)
        features = expectation(
            region_features.reshape(b, n1, -1), outer.to(feats.dtype), replace, baseline
        )
        return self.classifier(features), features

    def forward(
        self,
        view: Tensor,
        read_patches: Callable[..., Tensor],
        generator: torch.Generator | None = None,
        *,
        n: int | None = None,
        replace: bool | None = None,
        baseline: Tensor | float | None = None,
        attention_grad: bool = True,
        read_regions: Callable[[Tensor], Tensor] | None = None,
        visible: Callable[[Tensor, int], Tensor] | None = None,
        strict: bool = False,
    ) -> ATSOutput:
        """Attention → mask → sample → read → classify: the one pipeline of inference and training.

        The caller supplies the slide through callbacks, so the same code serves a Magnify run
        (one slide, :func:`~.magnify.magnify_attention_sampling`) and a training step (a batch
        of augmented slides, :class:`~.training.ATSTask`); both get their reads from
        :class:`~.reads.SlideReads`.

        Parameters
        ----------
        view : Tensor
            ``(B, 3, h, w)`` float RGB in ``[0, 1]``.
        read_patches : callable
            One level: ``read_patches(centres (B, n, 2)) -> (B * n, 3, P, P)``. Two-level:
            ``read_patches(region_centres (B, N1, 2), patch_centres (B * N1, N2, 2))`` with the
            patch centres region-normalised, returning ``(B * N1 * N2, 3, P, P)`` region-major.
        generator : torch.Generator, optional
            Drives every draw (the view's first, then the regions'); on the view's device.
        n : int, optional
            Patches drawn (per region when two-level); default ``config.n_patches``.
        replace : bool, optional
            Draw with replacement; default ``config.replace``.
        baseline : Tensor or float, optional
            Score-function baseline of the (outer) estimator; see :meth:`classify`.
        attention_grad : bool
            ``False`` detaches the attention from the estimator (REINFORCE training).
        read_regions : callable, optional
            Two-level only (then required): ``read_regions(centres (B, N1, 2)) ->
            (B * N1, 3, R, R)``; it is called before ``visible(…, 2)``.
        visible : callable, optional
            ``visible(attention, level) -> mask`` of ``attention``'s shape, non-zero where a
            position shows the slide; ``level`` is 1 for the view's attention ``(B, h', w')``
            and 2 for the regions' ``(B * N1, R', R')``. Every map is multiplied by its mask
            and renormalised before anything is drawn from it. ``None``: no masking.
        strict : bool
            Raise when a draw without replacement asks for more positions than a (masked)
            map has with non-zero attention (Magnify does; training samples regardless).

        Returns
        -------
        ATSOutput
            Logits, probabilities, the (masked) attention maps, the draws (indices, their
            attention and log-probabilities, centres), features and patches; two-level also
            the regions' attention, draws and centres.
        """
        cfg = self.config
        two = cfg.two_level
        if two and read_regions is None:
            raise ValueError(f"{cfg.name} is two-level: pass read_regions as well")
        n = cfg.n_patches if n is None else int(n)
        replace = cfg.replace if replace is None else replace
        b = view.shape[0]
        att = _restricted(self.attention(view), visible, 1)
        self._last_view_shape = (int(view.shape[-2]), int(view.shape[-1]))
        first = cfg.n_regions if two else n
        if strict:
            _check_draws(att, first, replace, "regions" if two else "patches")
        indices, sampled = self.sample(att, first, replace, generator)
        centres = self.positions_to_centres(indices, att.shape[-2:], view.shape[-2:]).to(
            view.device
        )
        p = cfg.patch_size
        if not two:
            patches = _checked(read_patches(centres), (b * n, 3, p, p), "read_patches", view)
            logits, features = self.classify(
                patches,
                att,
                indices,
                replace=replace,
                baseline=baseline,
                attention_grad=attention_grad,
            )
            return ATSOutput(
                logits=logits,
                probabilities=torch.softmax(logits, dim=1),
                attention=att,
                indices=indices,
                sampled_attention=sampled,
                draw_log_probs=draw_log_probs(sampled, replace),
                centres=centres,
                features=features,
                patches=patches,
            )
        r = cfg.region_size
        regions = _checked(read_regions(centres), (b * first, 3, r, r), "read_regions", view)
        region_att = _restricted(self.region_attention(regions), visible, 2)
        if strict:
            _check_draws(region_att, n, replace, "patches per region")
        region_idx, region_sampled = self.sample(region_att, n, replace, generator)
        region_centres = self.positions_to_centres(region_idx, region_att.shape[-2:]).to(
            view.device
        )
        patches = _checked(
            read_patches(centres, region_centres), (b * first * n, 3, p, p), "read_patches", view
        )
        logits, features = self.classify_two_level(
            patches,
            att,
            indices,
            region_att,
            region_idx,
            replace=replace,
            baseline=baseline,
            attention_grad=attention_grad,
        )
        log_q = torch.cat(
            [
                draw_log_probs(sampled, replace),
                draw_log_probs(region_sampled, replace).reshape(b, -1),
            ],
            dim=1,
        )
        return ATSOutput(
            logits=logits,
            probabilities=torch.softmax(logits, dim=1),
            attention=att,
            indices=indices,
            sampled_attention=sampled,
            draw_log_probs=log_q,
            centres=centres,
            features=features,
            patches=patches,
            region_attention=region_att,
            region_indices=region_idx,
            region_sampled_attention=region_sampled,
            region_centres=region_centres,
        )

    def pixels_processed(self, view_shape: tuple[int, int] | None = None) -> int:
        """RGB values the networks see per slide.

        One level: ``h * w * 3 + n * P * P * 3``; two-level adds the regions, ``N1 * R * R * 3``,
        and counts ``N1 * N2`` patches.

        Parameters
        ----------
        view_shape : tuple of int, optional
            ``(h, w)``; default the last forward's view, else ``view_size × view_size``.

        Returns
        -------
        int
        """
        cfg = self.config
        if view_shape is None:
            view_shape = self._last_view_shape or (cfg.view_size, cfg.view_size)
        h, w = int(view_shape[0]), int(view_shape[1])
        regions = cfg.n_regions * cfg.region_size**2 * 3 if cfg.two_level else 0
        return h * w * 3 + regions + cfg.total_patches * cfg.patch_size**2 * 3


def build_ats(name_or_config: str | ATSConfig = "ats") -> AttentionSampling:
    """Construct a model from a name in :data:`ATS_CONFIGS` or from a config.

    Parameters
    ----------
    name_or_config : str or ATSConfig
        A registered name or a configuration.

    Returns
    -------
    AttentionSampling
        With fresh (random) weights.
    """
    if isinstance(name_or_config, str):
        try:
            config = ATS_CONFIGS[name_or_config]()
        except KeyError:
            raise KeyError(
                f"unknown ATS config {name_or_config!r}; known: {sorted(ATS_CONFIGS)}"
            ) from None
    else:
        config = name_or_config
    return AttentionSampling(config)
