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

from collections.abc import Mapping
from typing import Any

from ..augment import Dihedral, augment
from ..family import Family, register_family
from .config import MAGNET_CONFIGS, MagNetConfig
from .magnify import magnify_magnet
from .model import GroupedBranch, LayerOutput, MagNet, MagNetOutput, StackBank
from .ops import compose_theta, grey_filter, identity_theta, normalized_grid
from .training import MagNetTask

__all__ = [
    "FAMILY",
    "MAGNET_CONFIGS",
    "Dihedral",
    "GroupedBranch",
    "LayerOutput",
    "MagNet",
    "MagNetConfig",
    "MagNetOutput",
    "MagNetTask",
    "StackBank",
    "augment",
    "compose_theta",
    "grey_filter",
    "identity_theta",
    "magnify_magnet",
    "normalized_grid",
]


def _from_dict(config: Mapping[str, Any]) -> MagNet:
    return MagNet(MagNetConfig.from_dict(config))


def _named(config: MagNetConfig):
    def factory() -> MagNet:
        return MagNet(config)

    factory.__name__ = f"build_{config.name.replace('-', '_')}"
    return factory


def _layers(model: MagNet) -> int:
    return int(model.num_layers)


FAMILY = register_family(
    Family(
        architecture=MagNet.architecture,
        config_class=MagNetConfig,
        build=_from_dict,
        configs={name: _named(cfg) for name, cfg in MAGNET_CONFIGS.items()},
        magnify=magnify_magnet,
        training_task=MagNetTask,
        adjustable_patches=False,
        expected_steps=_layers,
        order=10,
        description="magnifying networks: spatial transformers that zoom layer by layer",
    ),
    overwrite=True,
)
