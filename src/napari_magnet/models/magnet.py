"""MagNet: magnifying networks for whole-slide images (DESIGN §4).

Dimitriou, Arandjelović & Harrison, *Magnifying Networks for Histopathological Images with
Billions of Pixels*, Diagnostics 2024, 14, 524.

Overview
--------
A MagNet has ``L`` magnifying layers and a classification layer. Layer ``l`` receives ``N_l``
input images (``N_1 = 1``, ``N_{l+1} = N_l · P_l``) and emits ``P_l`` patches per input. For
every input ``n`` and output patch ``p`` a *branch stack* (three Branches and a 1×1 conv)
turns the 56×56 input ``I`` into one 56×56 map; ``entmax15`` over its positions gives a sparse
probability map ``p``, from which a spatial transformer ``θ = [[s, 0, t_x], [0, s, t_y]]`` is
computed; ``θ`` is applied to ``I'`` (the same region at twice the output size) with the
linearized multi-sampler (:func:`napari_magnet.models.sampler.affine_sample`). The last layer's
224×224 patches go through InceptionV3, a GRU over the patches in lineage order and an MLP to
one logit. Two auxiliary heads (ResNet-18) predict the slide label from layer 1's and layer 3's
patches.

Conventions (shared with the engine)
------------------------------------
* Images are float tensors in ``[0, 1]``, ``(…, 3, H, W)`` RGB.
* Normalized coordinates are those of :func:`torch.nn.functional.affine_grid` with the
  config's ``align_corners`` (default ``False``: ``±1`` are the outer *edges* of the image),
  ``x`` to the right, ``y`` down. A layer's ``I`` and ``I'`` cover the same square region, so
  they share one normalized frame.
* ``θ`` maps a patch's normalized coordinates to its input's: ``u_in = s · u_out + t``; the
  patch covers ``[t_x − s, t_x + s] × [t_y − s, t_y + s]`` of its input (with
  ``align_corners=False``, edge to edge).
* **Lineage order.** Layer ``l``'s inputs are ordered batch-major then lineage: row
  ``b · N_l + n``. Its patches are input-major: patch ``p`` of input ``n`` of slide ``b`` is row
  ``(b · N_l + n) · P_l + p``, and that patch is input ``n · P_l + p`` of layer ``l + 1``.
  The paper's names follow: layer 1's patches are ``1, 2, 3``; ``"1.2"`` is patch 2 of region 1.
* **θ chain.** ``theta_chain`` for layer ``l``'s patches is a ``(B · N_l · P_l, 2, 3)`` tensor
  (same row order as the patches, i.e. as layer ``l + 1``'s inputs): row ``r`` is the affine map
  from patch ``r``'s normalized frame to **layer 1's** normalized frame (the square region of the
  whole slide that layer 1's ``I`` shows, black padding included). It is the composition
  ``θ_1 ∘ θ_2 ∘ … ∘ θ_l`` of the θ's along the patch's lineage (:func:`compose_theta`), always of
  the form ``[[S, 0, T_x], [0, S, T_y]]``: the patch is the square
  ``[T_x − S, T_x + S] × [T_y − S, T_y + S]`` of layer 1's frame. With layer 1's region being the
  level-0 square box ``(X0, Y0, X0 + W, Y0 + W)`` (``align_corners=False``), the patch's level-0
  box is ``X0 + W·(T_x − S + 1)/2 … X0 + W·(T_x + S + 1)/2`` (same for y). It is computed from
  detached θ's: no gradient flows through region reading.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from entmax import entmax15

from .backbones import BACKBONES, FeatureBackbone, build_backbone
from .sampler import affine_sample

__all__ = [
    "MAGNET_CONFIGS",
    "Dihedral",
    "GroupedBranch",
    "LayerOutput",
    "MagNet",
    "MagNetConfig",
    "MagNetOutput",
    "StackBank",
    "augment",
    "compose_theta",
    "grey_filter",
    "identity_theta",
    "normalized_grid",
]

# The largest |t| the tanh squashing can produce is tanh(1) (expected coordinates lie in
# [-1, 1]); the inside-the-image bound s <= 1 - max|t| is therefore never below this.
_MIN_UPPER_SCALE = 1.0 - float(torch.tanh(torch.tensor(1.0)))


# ----------------------------------------------------------------------------- config


def _int_tuple(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


@dataclass(frozen=True)
class MagNetConfig:
    """Architecture of a MagNet (everything that determines its parameters and outputs).

    Attributes
    ----------
    name : str
        Config name (``"magnet3"``, ``"magnet4"``, ``"magnet3-lite"`` or a user's).
    patches_per_layer : tuple of int
        ``P_l`` for each magnifying layer; ``L = len(patches_per_layer)``.
    input_size : int
        Side of every layer input ``I`` and of the attention maps (56).
    final_size : int
        Side of the last layer's output patches, fed to the classifier (224).
    hi_factor : int
        ``I'`` is ``hi_factor`` × the layer's output size (2: 112 for 56, 448 for 224).
    classifier_backbone : str
        ``"inception_v3"`` or ``"small"`` (see :mod:`.backbones`).
    aux_backbone : str
        ``"resnet18"`` or ``"small"``.
    aux_layers : tuple of int
        The two layers whose patches feed the auxiliary heads, ``(1, 3)``; the paradoxical
        loss asks the second not to predict worse than the first.
    frozen_layers : tuple of int
        Layers whose first patch uses ``θ = identity`` (no branch stack), ``(2,)``.
    branch_features : tuple of int
        Output features of the three Branches (each divisible by 5, one fifth per path).
    grey_threshold : float
        Grey filter threshold on the 0–255 scale (15).
    align_corners : bool
        Normalized-coordinate convention for ``affine_grid``/sampling and the map grid.
    min_scale : float
        Lower bound of ``s`` (0.05).
    gru_hidden : int
        Hidden size of the GRU over the final patches.
    head_dims : tuple of int
        Hidden widths of the MLP after the GRU (512, 256), then one logit.
    small_widths : tuple of int
        Block widths of the ``"small"`` backbones (ignored by the torchvision ones).
    linearized_sampler : bool
        Linearized multi-sampling (True) or plain bilinear gradients.
    """

    architecture: ClassVar[str] = "magnet"

    name: str = "magnet3"
    patches_per_layer: tuple[int, ...] = (3, 2, 3)
    input_size: int = 56
    final_size: int = 224
    hi_factor: int = 2
    classifier_backbone: str = "inception_v3"
    aux_backbone: str = "resnet18"
    aux_layers: tuple[int, ...] = (1, 3)
    frozen_layers: tuple[int, ...] = (2,)
    branch_features: tuple[int, ...] = (15, 40, 5)
    grey_threshold: float = 15.0
    align_corners: bool = False
    min_scale: float = 0.05
    gru_hidden: int = 512
    head_dims: tuple[int, ...] = (512, 256)
    small_widths: tuple[int, ...] = (16, 32, 64, 64)
    linearized_sampler: bool = True

    def __post_init__(self) -> None:
        # Canonicalise types so that the hash does not depend on list-vs-tuple or 15 vs 15.0.
        set_ = object.__setattr__
        set_(self, "name", str(self.name))
        for f in ("patches_per_layer", "aux_layers", "frozen_layers", "branch_features",
                  "head_dims", "small_widths"):
            set_(self, f, _int_tuple(getattr(self, f)))
        for f in ("input_size", "final_size", "hi_factor", "gru_hidden"):
            set_(self, f, int(getattr(self, f)))
        for f in ("grey_threshold", "min_scale"):
            set_(self, f, float(getattr(self, f)))
        for f in ("align_corners", "linearized_sampler"):
            set_(self, f, bool(getattr(self, f)))
        self._validate()

    def _validate(self) -> None:
        L = len(self.patches_per_layer)
        if L < 1 or any(p < 1 for p in self.patches_per_layer):
            raise ValueError(f"patches_per_layer must be >= 1 each, got {self.patches_per_layer}")
        if self.classifier_backbone not in ("inception_v3", "small"):
            raise ValueError(f"classifier_backbone must be 'inception_v3' or 'small', "
                             f"got {self.classifier_backbone!r}")
        if self.aux_backbone not in BACKBONES:
            raise ValueError(f"aux_backbone must be one of {BACKBONES}, got {self.aux_backbone!r}")
        if len(self.aux_layers) != 2 or any(not 1 <= a <= L for a in self.aux_layers):
            raise ValueError(f"aux_layers must be two layers in 1..{L}, got {self.aux_layers}")
        if any(not 1 <= f <= L for f in self.frozen_layers):
            raise ValueError(f"frozen_layers must lie in 1..{L}, got {self.frozen_layers}")
        if len(self.branch_features) != 3 or any(f < 5 or f % 5 for f in self.branch_features):
            raise ValueError(f"branch_features must be three multiples of 5, "
                             f"got {self.branch_features}")
        if self.input_size < 4 or self.final_size < 4 or self.hi_factor < 1:
            raise ValueError("input_size, final_size must be >= 4 and hi_factor >= 1")
        if self.classifier_backbone == "inception_v3" and self.final_size < 75:
            raise ValueError("InceptionV3 needs final_size >= 75")
        if not 0.0 < self.min_scale <= _MIN_UPPER_SCALE:
            raise ValueError(f"min_scale must lie in (0, {_MIN_UPPER_SCALE:.4f}], "
                             f"got {self.min_scale}")
        if not 0.0 <= self.grey_threshold <= 255.0:
            raise ValueError(f"grey_threshold is on the 0-255 scale, got {self.grey_threshold}")

    # -- derived
    @property
    def num_layers(self) -> int:
        """Number of magnifying layers ``L``."""
        return len(self.patches_per_layer)

    @property
    def inputs_per_layer(self) -> tuple[int, ...]:
        """``N_l`` for each layer: ``N_1 = 1``, ``N_{l+1} = N_l · P_l``."""
        n, out = 1, []
        for p in self.patches_per_layer:
            out.append(n)
            n *= p
        return tuple(out)

    def learned_patches(self, layer: int) -> tuple[int, ...]:
        """Indices of the patches of ``layer`` (1-based) that have a branch stack."""
        P = self.patches_per_layer[layer - 1]
        start = 1 if layer in self.frozen_layers else 0
        return tuple(range(start, P))

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MagNetConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MagNetConfig keys: {unknown}")
        return cls(**dict(d))

    def canonical_json(self) -> str:
        """Sorted, compact JSON of :meth:`to_dict` (what :meth:`config_hash` hashes)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True)

    def config_hash(self) -> str:
        """sha256 hex digest of :meth:`canonical_json`."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


MAGNET_CONFIGS: dict[str, MagNetConfig] = {
    "magnet3": MagNetConfig(name="magnet3", patches_per_layer=(3, 2, 3)),
    "magnet4": MagNetConfig(name="magnet4", patches_per_layer=(3, 2, 3, 2)),
    "magnet3-lite": MagNetConfig(
        name="magnet3-lite",
        patches_per_layer=(3, 2, 3),
        classifier_backbone="small",
        aux_backbone="small",
        gru_hidden=64,
        head_dims=(128, 64),
        small_widths=(16, 32, 48, 64),
    ),
}


# ----------------------------------------------------------------------------- helpers


def grey_filter(images: torch.Tensor, threshold: float = 15.0) -> torch.Tensor:
    """Blacken pixels whose R, G, B differ pairwise by less than ``threshold`` (0–255 scale).

    "Pairwise less than" is ``max(R, G, B) − min(R, G, B) < threshold``. Float images are in
    ``[0, 1]`` (the threshold is divided by 255, with a 1e-3 grey-level tolerance so that
    images converted from 8 bits keep a difference of exactly ``threshold``); ``uint8`` images
    are compared on 0–255 directly. The mask is not differentiated (kept pixels pass their
    gradient unchanged).

    Parameters
    ----------
    images : torch.Tensor
        ``(…, 3, H, W)``.
    threshold : float
        Threshold on the 0–255 scale.

    Returns
    -------
    torch.Tensor
        Same shape and dtype.
    """
    if images.shape[-3] != 3:
        raise ValueError(f"grey_filter expects (..., 3, H, W), got {tuple(images.shape)}")
    if threshold <= 0:
        return images
    rng = images.amax(dim=-3, keepdim=True) - images.amin(dim=-3, keepdim=True)
    if images.dtype == torch.uint8:
        keep = rng >= threshold
    else:
        keep = rng.float() >= (threshold - 1e-3) / 255.0
    return images * keep.to(images.dtype)


def normalized_grid(size: int, align_corners: bool, *, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """Normalized coordinates of the ``size`` pixel centres along an axis.

    ``align_corners=False``: ``(2i + 1)/size − 1``; ``True``: ``linspace(−1, 1, size)``.
    """
    if align_corners:
        return torch.linspace(-1.0, 1.0, size, device=device, dtype=dtype)
    return (torch.arange(size, device=device, dtype=dtype) * 2 + 1) / size - 1


def identity_theta(n: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(n, 2, 3)`` identity affine maps."""
    # Built on the device (no host-to-device copy), so CUDA graphs can capture it.
    theta = torch.zeros(n, 2, 3, device=device, dtype=dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    return theta


def compose_theta(parent_chain: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Compose each input's chain with its patches' θ: ``chain ∘ θ``.

    Parameters
    ----------
    parent_chain : torch.Tensor
        ``(N, 2, 3)``: row ``n`` maps input ``n``'s normalized frame to layer 1's frame
        (identity for layer 1's input).
    theta : torch.Tensor
        ``(N, P, 2, 3)``: θ of input ``n``'s patch ``p`` (patch frame → input frame).

    Returns
    -------
    torch.Tensor
        ``(N·P, 2, 3)`` in lineage order (row ``n·P + p``): patch frame → layer 1's frame,
        ``M = [A_c A_θ | A_c t_θ + t_c]``.
    """
    if parent_chain.dim() != 3 or parent_chain.shape[1:] != (2, 3):
        raise ValueError(f"parent_chain must be (N, 2, 3), got {tuple(parent_chain.shape)}")
    if theta.dim() != 4 or theta.shape[2:] != (2, 3) or theta.shape[0] != parent_chain.shape[0]:
        raise ValueError(f"theta must be (N, P, 2, 3) with N={parent_chain.shape[0]}, "
                         f"got {tuple(theta.shape)}")
    n, p = theta.shape[:2]
    dtype = torch.promote_types(parent_chain.dtype, theta.dtype)
    a_c = parent_chain[:, None, :, :2].to(dtype)  # (N, 1, 2, 2)
    t_c = parent_chain[:, None, :, 2:].to(dtype)  # (N, 1, 2, 1)
    a_t = theta[..., :2].to(dtype)
    t_t = theta[..., 2:].to(dtype)
    out = torch.cat([a_c @ a_t, a_c @ t_t + t_c], dim=-1)
    return out.reshape(n * p, 2, 3)


def _st_clamp_min(x: torch.Tensor, lo: float) -> torch.Tensor:
    """``max(x, lo)`` in value, identity in gradient (straight-through lower clamp).

    A hard clamp would give a scale that collapsed below ``lo`` no gradient at all; this keeps
    the signal that asks the map to spread out again.
    """
    return x + (x.clamp_min(lo) - x).detach()


# ----------------------------------------------------------------------------- augmentation

_A_FLIP = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
_A_ROT = torch.tensor([[0.0, -1.0], [1.0, 0.0]])


@dataclass(frozen=True)
class Dihedral:
    """One of the 8 symmetries of the square: optional horizontal flip, then ``k`` quarter turns.

    ``apply`` acts on the last two dims (``torch.flip(x, [-1])`` then
    ``torch.rot90(x, k, (-2, -1))``); vertical flips are ``flip + k=2``. On normalized
    coordinates (x right, y down; exact for square images under either ``align_corners``):
    ``apply(X)(u) = X(A u)`` with ``A = matrix()``.

    For training with region reads: if layer 1 sees ``apply(I1)``, a θ chain ``M`` computed in
    that augmented frame corresponds to ``A @ M`` in the slide's own frame
    (:meth:`to_original`), which samples exactly ``apply`` of the region read at the square box
    centred at ``A·T`` with half-size ``S``. So ``read_hi`` for an augmented forward can read
    the box of ``to_original(chain)`` and return ``apply(region)``.
    """

    k: int = 0
    flip: bool = False

    @classmethod
    def random(cls, generator: torch.Generator | None = None) -> Dihedral:
        """A uniformly random element (from ``generator``, or torch's global RNG)."""
        i = int(torch.randint(0, 8, (1,), generator=generator).item())
        return cls(k=i % 4, flip=bool(i // 4))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform images ``(…, H, W)`` (square for the coordinate identity to hold)."""
        if self.flip:
            x = torch.flip(x, dims=[-1])
        if self.k % 4:
            x = torch.rot90(x, self.k % 4, dims=(-2, -1))
        return x

    def matrix(self, *, device=None, dtype=torch.float32) -> torch.Tensor:
        """The 2×2 ``A`` with ``apply(X)(u) = X(A u)``: ``A = F^flip · R^k``."""
        a = torch.eye(2)
        if self.flip:
            a = a @ _A_FLIP
        for _ in range(self.k % 4):
            a = a @ _A_ROT
        return a.to(device=device, dtype=dtype)

    def to_original(self, chain: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 2, 3)`` chains from the augmented frame to the original: ``A @ chain``."""
        return self.matrix(device=chain.device, dtype=chain.dtype) @ chain


def augment(*tensors: torch.Tensor, op: Dihedral | None = None,
            generator: torch.Generator | None = None) -> tuple[tuple[torch.Tensor, ...], Dihedral]:
    """Apply one random flip/rotation consistently to every tensor (last two dims).

    Returns the transformed tensors and the :class:`Dihedral` used (pass ``op`` to reuse one).
    """
    op = Dihedral.random(generator) if op is None else op
    return tuple(op.apply(t) for t in tensors), op


# ----------------------------------------------------------------------------- branch stacks


class _GConv(nn.Module):
    """Grouped conv (no bias) + BatchNorm + ReLU: ``groups`` independent convs ``cin→cout``."""

    def __init__(self, groups: int, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(groups * cin, groups * cout, k, padding=k // 2, groups=groups,
                              bias=False)
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
        self.path5 = nn.Sequential(_GConv(groups, w, w, 3), _GConv(groups, w, w, 3),
                                   _GConv(groups, w, f, 3))
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

    def __init__(self, config: MagNetConfig,
                 *, backbone_weights: Mapping[str, Any] | None = None) -> None:
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

        self.classifier = build_backbone(cfg.classifier_backbone, weights=bw.get("classifier"),
                                         small_widths=cfg.small_widths)
        self.gru = nn.GRU(self.classifier.out_features, cfg.gru_hidden, batch_first=True)
        head: list[nn.Module] = []
        d = cfg.gru_hidden
        for h in cfg.head_dims:
            head += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        head.append(nn.Linear(d, 1))
        self.head = nn.Sequential(*head)
        self.aux = nn.ModuleDict({
            f"layer{a}": _AuxHead(build_backbone(cfg.aux_backbone, weights=bw.get("aux"),
                                                 small_widths=cfg.small_widths))
            for a in cfg.aux_layers
        })

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
        return (n_in * cfg.input_size ** 2 + n_final * cfg.final_size ** 2) * 3

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
            s_raw = ((px * (gx - cx.unsqueeze(-1)).abs()).sum(-1)
                     + (py * (gy - cy.unsqueeze(-1)).abs()).sum(-1))
            tx, ty = torch.tanh(cx), torch.tanh(cy)
            upper = 1.0 - torch.maximum(tx.abs(), ty.abs())
            s = torch.minimum(_st_clamp_min(s_raw, self.config.min_scale), upper)
            zero = torch.zeros_like(s)
            theta = torch.stack([torch.stack([s, zero, tx], -1),
                                 torch.stack([zero, s, ty], -1)], -2)
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
            raise ValueError(f"layer {layer}: lo must be (B*{n_in}, 3, {S}, {S}), "
                             f"got {tuple(lo.shape)}")
        if hi.dim() != 4 or hi.shape[1:] != (3, Hs, Hs) or hi.shape[0] != lo.shape[0]:
            raise ValueError(f"layer {layer}: hi must be ({lo.shape[0]}, 3, {Hs}, {Hs}), "
                             f"got {tuple(hi.shape)}")
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
            patches = affine_sample(src, theta.reshape(bn * P, 2, 3).to(work), out,
                                    align_corners=cfg.align_corners,
                                    linearized=cfg.linearized_sampler)
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
            raise ValueError(f"no auxiliary head for layer {which}; "
                             f"heads: {self.config.aux_layers}")
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
    def forward(self, lo1: torch.Tensor, hi1: torch.Tensor,
                read_hi: Callable[[int, torch.Tensor], torch.Tensor]) -> MagNetOutput:
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
                    raise ValueError(f"read_hi({nxt}, …) returned {tuple(hi.shape)}, "
                                     f"expected {want}")
                hi = hi.detach().to(device=out.patches.device, dtype=out.patches.dtype)
                lo = out.patches
        logit = self.classify(layers[-1].patches, b)
        aux = {a: self.aux_logit(a, layers[a - 1].patches, b) for a in self.config.aux_layers}
        return MagNetOutput(logit=logit, aux_logits=aux, layers=layers, theta_chains=chains)

    def loss(self, out: MagNetOutput,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
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

