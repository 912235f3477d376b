"""The MagNet module: branch stacks, magnifying layers, classifier and auxiliary heads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from entmax import entmax15

from ..backbones import FeatureBackbone, build_backbone
from ..sampler import affine_sample
from .config import MagNetConfig
from .ops import _st_clamp_min, compose_theta, grey_filter, identity_theta, normalized_grid

__all__ = ["GroupedBranch", "LayerOutput", "MagNet", "MagNetOutput", "StackBank"]


class _GConv(nn.Module):
    """Grouped conv (no bias) + BatchNorm + ReLU: ``groups`` independent convs ``cin→cout``."""

    def __init__(self, groups: int, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            groups * cin, groups * cout, k, padding=k // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(groups * cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.relu(self.bn(self.conv(x)))


class GroupedBranch(nn.Module):
    """``groups`` independent Branches run as one set of grouped convolutions.

    A Branch with ``f`` features per path and inner width ``w = max(⌊3f/4⌋, 1)`` is five
    parallel paths, concatenated in this order:

    1. 1×1 → f
    2. 1×1 → w, 3×3 → f
    3. 1×1 → w, 3×3 → w, 3×3 → f
    4. maxpool 3×3 (stride 1, pad 1), 1×1 → f
    5. 1×1 → w, 3×3 → w, 3×3 → w, 3×3 → f

    each conv being conv (no bias) + BatchNorm + ReLU, with padding keeping the size. The
    four 1×1 convs that read the input (paths 1, 2, 3, 5) are stored as one grouped conv of
    ``f + 3w`` outputs per group: per output channel that is exactly four separate convs (their
    BatchNorm is per channel too). Channels are laid out group-major: group ``g`` owns
    channels ``[g·c, (g+1)·c)`` of every tensor, so each group is one independent stack.
    """

    def __init__(self, groups: int, cin: int, f: int) -> None:
        super().__init__()
        w = max((3 * f) // 4, 1)
        self.groups, self.cin, self.f, self.w = groups, cin, f, w
        self.stem = _GConv(groups, cin, f + 3 * w, 1)
        self.path2 = _GConv(groups, w, f, 3)
        self.path3 = nn.Sequential(_GConv(groups, w, w, 3), _GConv(groups, w, f, 3))
        self.path4 = _GConv(groups, cin, f, 1)
        self.path5 = nn.Sequential(
            _GConv(groups, w, w, 3), _GConv(groups, w, w, 3), _GConv(groups, w, f, 3)
        )
        self.out_channels = 5 * f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, G·cin, H, W) -> (B, G·5f, H, W)``."""
        b, _, h, w_ = x.shape
        G, f, w = self.groups, self.f, self.w
        s = self.stem(x).view(b, G, f + 3 * w, h, w_)

        def part(lo: int, hi: int) -> torch.Tensor:
            return s[:, :, lo:hi].reshape(b, G * (hi - lo), h, w_)

        p1 = s[:, :, :f]
        p2 = self.path2(part(f, f + w)).view(b, G, f, h, w_)
        p3 = self.path3(part(f + w, f + 2 * w)).view(b, G, f, h, w_)
        p4 = self.path4(F.max_pool2d(x, 3, stride=1, padding=1)).view(b, G, f, h, w_)
        p5 = self.path5(part(f + 2 * w, f + 3 * w)).view(b, G, f, h, w_)
        return torch.cat([p1, p2, p3, p4, p5], dim=2).reshape(b, G * 5 * f, h, w_)


class StackBank(nn.Module):
    """All branch stacks of one layer: ``groups`` × (3 Branches 3→15→40→5, 1×1 conv → 1 map).

    Parameters
    ----------
    groups : int
        Number of stacks (``N_l`` × learned patches per input), group ``g = n·K + k``.
    features : sequence of int
        Branch output features (multiples of 5).
    """

    def __init__(self, groups: int, features: Sequence[int] = (15, 40, 5)) -> None:
        super().__init__()
        self.groups = groups
        blocks, cin = [], 3
        for f in features:
            blocks.append(GroupedBranch(groups, cin, f // 5))
            cin = f
        self.branches = nn.ModuleList(blocks)
        self.to_map = nn.Conv2d(groups * cin, groups, 1, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, G·3, H, W) -> (B, G, H, W)`` map logits."""
        for blk in self.branches:
            x = blk(x)
        return self.to_map(x)


# ----------------------------------------------------------------------------- outputs


@dataclass
class LayerOutput:
    """What one magnifying layer computes.

    Attributes
    ----------
    theta : torch.Tensor
        ``(B·N_l, P_l, 2, 3)`` spatial transformers (patch frame → input frame).
    maps : torch.Tensor
        ``(B·N_l, P_l, H, W)`` entmax15 probabilities (each sums to 1); a frozen patch's map is
        uniform ``1/(H·W)`` (it takes the whole input).
    patches : torch.Tensor
        ``(B·N_l·P_l, 3, out, out)`` in lineage order (input-major).
    """

    theta: torch.Tensor
    maps: torch.Tensor
    patches: torch.Tensor


@dataclass
class MagNetOutput:
    """Result of :meth:`MagNet.forward` for ``B`` slides.

    Attributes
    ----------
    logit : torch.Tensor
        ``(B,)`` classification logits (GRU head).
    aux_logits : dict of int to torch.Tensor
        ``{layer: (B,)}`` logits of the auxiliary heads (keys = ``config.aux_layers``).
    layers : list of LayerOutput
        One per magnifying layer.
    theta_chains : list of torch.Tensor
        ``theta_chains[l-1]``: ``(B·N_l·P_l, 2, 3)`` chains of layer ``l``'s patches (module
        docstring); detached.
    """

    logit: torch.Tensor
    aux_logits: dict[int, torch.Tensor]
    layers: list[LayerOutput]
    theta_chains: list[torch.Tensor] = field(default_factory=list)

    @property
    def probability(self) -> torch.Tensor:
        """``sigmoid(logit)``."""
        return torch.sigmoid(self.logit.float())


# ----------------------------------------------------------------------------- model


class _AuxHead(nn.Module):
    """Backbone features of each patch, mean over a slide's patches, linear → 1 logit.

    The mean of the per-patch logits of a ResNet-18 whose ``fc`` outputs 1 equals ``fc`` of the
    mean-pooled features (``fc`` is linear): this is that, computed in the cheaper order.
    """

    def __init__(self, backbone: FeatureBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.out_features, 1)

    def forward(self, patches: torch.Tensor, batch: int) -> torch.Tensor:  # noqa: D102
        feats = self.backbone(patches)
        feats = feats.view(batch, -1, feats.shape[-1]).mean(dim=1)
        return self.fc(feats).squeeze(-1)


class MagNet(nn.Module):
    """Magnifying network (see the module docstring for the conventions).

    Parameters
    ----------
    config : MagNetConfig
        Architecture.
    backbone_weights : mapping, optional
        Local ImageNet weight files: ``{"classifier": path, "aux": path}`` (either key
        optional); never downloaded.

    Attributes
    ----------
    config : MagNetConfig
    num_layers : int
    inputs_per_layer : tuple of int
        ``N_l``.
    stacks : nn.ModuleList
        One :class:`StackBank` per layer (``nn.Identity`` for a layer with no learned patch).
    classifier, gru, head, aux : the classification layer and auxiliary heads.
    model_name : str
        Registry name (set by :func:`~napari_magnet.models.registry.load_model`).
    checkpoint_sha256 : str
        sha256 of the weights file the model was loaded from ("" for random init).
    """

    architecture = "magnet"

    def __init__(
        self, config: MagNetConfig, *, backbone_weights: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        self.num_layers = cfg.num_layers
        self.inputs_per_layer = cfg.inputs_per_layer
        self.model_name = cfg.name
        self.checkpoint_sha256 = ""
        bw = dict(backbone_weights or {})

        stacks: list[nn.Module] = []
        for layer in range(1, self.num_layers + 1):
            k = len(cfg.learned_patches(layer))
            g = self.inputs_per_layer[layer - 1] * k
            stacks.append(StackBank(g, cfg.branch_features) if g else nn.Identity())
        self.stacks = nn.ModuleList(stacks)

        self.classifier = build_backbone(
            cfg.classifier_backbone, weights=bw.get("classifier"), small_widths=cfg.small_widths
        )
        self.gru = nn.GRU(self.classifier.out_features, cfg.gru_hidden, batch_first=True)
        head: list[nn.Module] = []
        d = cfg.gru_hidden
        for h in cfg.head_dims:
            head += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        head.append(nn.Linear(d, 1))
        self.head = nn.Sequential(*head)
        self.aux = nn.ModuleDict(
            {
                f"layer{a}": _AuxHead(
                    build_backbone(
                        cfg.aux_backbone, weights=bw.get("aux"), small_widths=cfg.small_widths
                    )
                )
                for a in cfg.aux_layers
            }
        )

    # -- geometry
    def _check_layer(self, layer: int) -> None:
        if not 1 <= layer <= self.num_layers:
            raise ValueError(f"layer must be in 1..{self.num_layers}, got {layer}")

    def out_size(self, layer: int) -> int:
        """Side of layer ``layer``'s output patches: ``input_size``, or ``final_size`` (last)."""
        self._check_layer(layer)
        return self.config.final_size if layer == self.num_layers else self.config.input_size

    def hi_size(self, layer: int) -> int:
        """Side of the ``I'`` layer ``layer`` samples from (``hi_factor × out_size``)."""
        return self.config.hi_factor * self.out_size(layer)

    def pixels_processed(self) -> int:
        """The paper's count of RGB values the networks see per slide.

        ``(Σ_l N_l · input_size² + N_L · P_L · final_size²) · 3``: (10·56² + 18·224²)·3 for
        3 layers (3,2,3), (28·56² + 36·224²)·3 for 4 layers (3,2,3,2).
        """
        cfg = self.config
        n_in = sum(self.inputs_per_layer)
        n_final = self.inputs_per_layer[-1] * cfg.patches_per_layer[-1]
        return (n_in * cfg.input_size**2 + n_final * cfg.final_size**2) * 3

    # -- one layer
    def theta_from_maps(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial transformers from map logits.

        Computed in fp32 with autocast disabled:

        * ``p = entmax15(logits)`` over the ``H·W`` positions;
        * ``(c_x, c_y) = E_p[(x, y)]``, the expected pixel-centre coordinates on the
          normalized grid (:func:`normalized_grid`);
        * ``t = tanh(c)``, **the expected coordinates themselves are squashed** (so
          ``|t| ≤ tanh(1) ≈ 0.76``);
        * ``s_raw = E_p[|x − c_x| + |y − c_y|]``, the expected L1 distance from the
          (unsquashed) expected centre — 1 for a uniform map, 0 for a point mass;
        * ``s = min(max(s_raw, min_scale), 1 − max(|t_x|, |t_y|))``: the lower clamp is
          straight-through (gradient 1), the upper bound routes its gradient to ``t``; since
          ``1 − max|t| ≥ 1 − tanh(1) > min_scale``, ``min_scale ≤ s ≤ 1`` and the patch lies
          inside its input;
        * ``θ = [[s, 0, t_x], [0, s, t_y]]``.

        Parameters
        ----------
        logits : torch.Tensor
            ``(…, H, W)``.

        Returns
        -------
        (p, theta) : (torch.Tensor, torch.Tensor)
            ``p`` ``(…, H, W)`` float32; ``theta`` ``(…, 2, 3)`` float32.
        """
        h, w = logits.shape[-2:]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            z = logits.float().flatten(-2)
            p = entmax15(z, dim=-1).view(logits.shape)
            gx = normalized_grid(w, self.config.align_corners, device=p.device)
            gy = normalized_grid(h, self.config.align_corners, device=p.device)
            px = p.sum(dim=-2)  # (…, W) marginal over columns
            py = p.sum(dim=-1)  # (…, H)
            cx = (px * gx).sum(-1)
            cy = (py * gy).sum(-1)
            s_raw = (px * (gx - cx.unsqueeze(-1)).abs()).sum(-1) + (
                py * (gy - cy.unsqueeze(-1)).abs()
            ).sum(-1)
            tx, ty = torch.tanh(cx), torch.tanh(cy)
            upper = 1.0 - torch.maximum(tx.abs(), ty.abs())
            s = torch.minimum(_st_clamp_min(s_raw, self.config.min_scale), upper)
            zero = torch.zeros_like(s)
            theta = torch.stack(
                [torch.stack([s, zero, tx], -1), torch.stack([zero, s, ty], -1)], -2
            )
        return p, theta

    def magnify_layer(self, layer: int, lo: torch.Tensor, hi: torch.Tensor) -> LayerOutput:
        """Run magnifying layer ``layer`` (1-based) on its ``B·N_l`` inputs.

        Parameters
        ----------
        layer : int
            1-based layer index.
        lo : torch.Tensor
            ``(B·N_l, 3, input_size, input_size)`` inputs ``I`` in ``[0, 1]``, rows in lineage
            order (``b·N_l + n``).
        hi : torch.Tensor
            ``(B·N_l, 3, hi_size, hi_size)`` the same regions at ``hi_size`` (``I'``).

        Returns
        -------
        LayerOutput
            Both inputs are grey-filtered first; patches are sampled from ``hi``.
        """
        self._check_layer(layer)
        cfg = self.config
        n_in = self.inputs_per_layer[layer - 1]
        P = cfg.patches_per_layer[layer - 1]
        S, Hs, out = cfg.input_size, self.hi_size(layer), self.out_size(layer)
        if lo.dim() != 4 or lo.shape[1:] != (3, S, S) or lo.shape[0] % n_in:
            raise ValueError(
                f"layer {layer}: lo must be (B*{n_in}, 3, {S}, {S}), got {tuple(lo.shape)}"
            )
        if hi.dim() != 4 or hi.shape[1:] != (3, Hs, Hs) or hi.shape[0] != lo.shape[0]:
            raise ValueError(
                f"layer {layer}: hi must be ({lo.shape[0]}, 3, {Hs}, {Hs}), got {tuple(hi.shape)}"
            )
        bn = lo.shape[0]
        b = bn // n_in
        lo = grey_filter(lo, cfg.grey_threshold)
        hi = grey_filter(hi, cfg.grey_threshold)

        learned = cfg.learned_patches(layer)
        k = len(learned)
        thetas: list[torch.Tensor | None] = [None] * P
        maps: list[torch.Tensor | None] = [None] * P
        if k:
            x = lo.view(b, n_in, 1, 3, S, S).expand(b, n_in, k, 3, S, S)
            logits = self.stacks[layer - 1](x.reshape(b, n_in * k * 3, S, S))
            p, th = self.theta_from_maps(logits.view(bn, k, S, S))
            for j, pi in enumerate(learned):
                thetas[pi], maps[pi] = th[:, j], p[:, j]
        for pi in range(P):
            if thetas[pi] is None:  # frozen patch: the whole input
                thetas[pi] = identity_theta(bn, device=lo.device)
                maps[pi] = torch.full((bn, S, S), 1.0 / (S * S), device=lo.device)
        theta = torch.stack(thetas, dim=1)  # (BN, P, 2, 3)
        prob = torch.stack(maps, dim=1)
        # Sampling runs in (at least) fp32 with autocast off: under bf16 autocast the grid
        # would be computed in bf16 (8-bit mantissa: ~3 pixels of error across a 448 image).
        work = torch.promote_types(hi.dtype, torch.float32)
        src = hi.to(work).unsqueeze(1).expand(bn, P, 3, Hs, Hs).reshape(bn * P, 3, Hs, Hs)
        with torch.autocast(device_type=hi.device.type, enabled=False):
            patches = affine_sample(
                src,
                theta.reshape(bn * P, 2, 3).to(work),
                out,
                align_corners=cfg.align_corners,
                linearized=cfg.linearized_sampler,
            )
        return LayerOutput(theta=theta, maps=prob, patches=patches)

    # -- heads
    def aux_logit(self, which: int, patches: torch.Tensor, batch: int) -> torch.Tensor:
        """Slide-level logits ``(batch,)`` of the auxiliary head fed by layer ``which``'s patches.

        ``patches``: ``(batch·K, 3, h, w)`` in lineage order; the head mean-pools its
        backbone features over each slide's ``K`` patches, then a linear layer gives one logit
        (= mean of per-patch logits, the layer being linear).
        """
        key = f"layer{which}"
        if key not in self.aux:
            raise ValueError(
                f"no auxiliary head for layer {which}; heads: {self.config.aux_layers}"
            )
        if patches.shape[0] % batch:
            raise ValueError(f"{patches.shape[0]} patches do not split into {batch} slides")
        return self.aux[key](patches, batch)

    def classify(self, final_patches: torch.Tensor, batch: int) -> torch.Tensor:
        """``(batch·T, 3, final, final)`` patches (lineage order) → ``(batch,)`` logits.

        Backbone features → GRU over each slide's ``T`` patches in lineage order → last hidden
        state → MLP (``head_dims``) → one logit.
        """
        if final_patches.shape[0] % batch:
            raise ValueError(f"{final_patches.shape[0]} patches do not split into {batch} slides")
        feats = self.classifier(final_patches)
        feats = feats.view(batch, -1, feats.shape[-1])
        # CUDA autocast runs cuDNN RNNs in float16 whatever its dtype; features of an
        # InceptionV3 whose BatchNorm statistics have not settled reach ~1e7 in eval mode and
        # overflow float16's 65504 to inf → NaN. The GRU is small: run it in float32.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            _, h_n = self.gru(feats.float())
        return self.head(h_n[-1]).squeeze(-1)

    # -- whole model
    def forward(
        self,
        lo1: torch.Tensor,
        hi1: torch.Tensor,
        read_hi: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> MagNetOutput:
        """Full forward for ``B`` slides.

        Parameters
        ----------
        lo1 : torch.Tensor
            ``(B, 3, input_size, input_size)`` layer 1's ``I`` (whole slide, letterboxed).
        hi1 : torch.Tensor
            ``(B, 3, hi_size(1), hi_size(1))`` layer 1's ``I'``.
        read_hi : callable
            ``read_hi(layer, theta_chain) -> (B·N_layer, 3, hi_size(layer), hi_size(layer))``:
            ``I'`` of layer ``layer``'s inputs, given their θ chains ``(B·N_layer, 2, 3)``
            (module docstring; rows batch-major, lineage order). Its result is detached.

        Returns
        -------
        MagNetOutput
            Layer ``l + 1``'s ``I`` is layer ``l``'s patches (so the classification loss
            reaches every layer's θ through the sampler); its ``I'`` comes from ``read_hi``.
        """
        b = lo1.shape[0]
        chain = identity_theta(b, device=lo1.device)
        lo, hi = lo1, hi1
        layers: list[LayerOutput] = []
        chains: list[torch.Tensor] = []
        for layer in range(1, self.num_layers + 1):
            out = self.magnify_layer(layer, lo, hi)
            layers.append(out)
            chain = compose_theta(chain, out.theta.detach().float())
            chains.append(chain)
            if layer < self.num_layers:
                nxt = layer + 1
                hs = self.hi_size(nxt)
                hi = read_hi(nxt, chain)
                want = (chain.shape[0], 3, hs, hs)
                if tuple(hi.shape) != want:
                    raise ValueError(
                        f"read_hi({nxt}, …) returned {tuple(hi.shape)}, expected {want}"
                    )
                hi = hi.detach().to(device=out.patches.device, dtype=out.patches.dtype)
                lo = out.patches
        logit = self.classify(layers[-1].patches, b)
        aux = {a: self.aux_logit(a, layers[a - 1].patches, b) for a in self.config.aux_layers}
        return MagNetOutput(logit=logit, aux_logits=aux, layers=layers, theta_chains=chains)

    def loss(
        self, out: MagNetOutput, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """MagNet's loss ``L1 + L2 + L3`` for binary slide labels.

        * ``L1`` (paradoxical) = ``mean(max(P_a − P_b, 0))`` with ``P`` the probability the
          auxiliary heads ``a, b = aux_layers`` (layers 1 and 3) give to the true class
          (``y·p + (1 − y)·(1 − p)``, so soft labels work too);
        * ``L2`` = BCE(aux head a) + BCE(aux head b);
        * ``L3`` = BCE of the GRU logit.

        All in fp32. Returns the total (a tensor) and the parts as floats:
        ``paradoxical``, ``aux``, ``aux1`` / ``aux3`` (``aux<layer>``), ``classification``,
        ``total``.
        """
        y = labels.to(device=out.logit.device, dtype=torch.float32).reshape(-1)
        a_first, a_second = self.config.aux_layers
        z1 = out.aux_logits[a_first].float()
        z3 = out.aux_logits[a_second].float()
        p1, p3 = torch.sigmoid(z1), torch.sigmoid(z3)
        pt1 = y * p1 + (1 - y) * (1 - p1)
        pt3 = y * p3 + (1 - y) * (1 - p3)
        l1 = F.relu(pt1 - pt3).mean()
        bce1 = F.binary_cross_entropy_with_logits(z1, y)
        bce3 = F.binary_cross_entropy_with_logits(z3, y)
        l2 = bce1 + bce3
        l3 = F.binary_cross_entropy_with_logits(out.logit.float(), y)
        total = l1 + l2 + l3
        parts = {
            "paradoxical": float(l1.detach()),
            "aux": float(l2.detach()),
            f"aux{a_first}": float(bce1.detach()),
            f"aux{a_second}": float(bce3.detach()),
            "classification": float(l3.detach()),
            "total": float(total.detach()),
        }
        return total, parts

    def extra_repr(self) -> str:  # noqa: D102
        return f"config={self.config.name!r}, P={self.config.patches_per_layer}"
