"""ZoomMIL: differentiable zooming for multiple-instance learning on slides (DESIGN §9).

Thandiackal et al., *Differentiable Zooming for Multiple Instance Learning on Whole-Slide
Images*, ECCV 2022 (public code: histocartography/zoommil, read as an anchor only).

A gated-attention MIL model looks at the coarse patches of a slide (their embeddings by a
frozen patch encoder), pools them, and picks the ``K`` patches to zoom into; their children at
the next magnification form the next bag, and so on; the pooled features of every
magnification are summed and classified. Training selects with a perturbed top-K
(:mod:`.topk`) over precomputed feature bags (:mod:`.training`); inference selects the hard
top-K and embeds only the children of what it selected (:mod:`.magnify`). The ``"abmil"``
configuration, one magnification and no zoom, is the gated-attention MIL baseline.

* :mod:`.config` — :class:`ZoomMILConfig` and the named configurations;
* :mod:`.topk` — the perturbed top-K;
* :mod:`.model` — :class:`ZoomMIL` (``zoom`` streams one :class:`ZoomLevel` per
  magnification), :func:`bag_sizes` and :func:`slide_flops`;
* :mod:`.magnify` — the run through ``magnify``;
* :mod:`.training` — the training task over feature bags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..family import Family, register_family
from .config import ZOOMMIL_CONFIGS, ZoomMILConfig
from .magnify import first_bag_rows, magnify_zoommil, slide_grid, stored_first_features
from .model import (
    GatedAttention,
    SlideFlops,
    ZoomLevel,
    ZoomMIL,
    ZoomOutput,
    bag_sizes,
    encoder_flops_per_patch,
    slide_flops,
)
from .topk import PerturbedTopK, hard_topk, hard_topk_indicator, perturbed_topk
from .training import TRAIN_OPTIONS

__all__ = [
    "FAMILY",
    "ZOOMMIL_CONFIGS",
    "GatedAttention",
    "PerturbedTopK",
    "SlideFlops",
    "ZoomLevel",
    "ZoomMIL",
    "ZoomMILConfig",
    "ZoomOutput",
    "bag_sizes",
    "encoder_flops_per_patch",
    "first_bag_rows",
    "hard_topk",
    "hard_topk_indicator",
    "magnify_zoommil",
    "perturbed_topk",
    "slide_flops",
    "slide_grid",
    "stored_first_features",
]


def _from_dict(config: Mapping[str, Any]) -> ZoomMIL:
    # a checkpoint's state dict supplies the encoder's weights: no random-weights warning
    return ZoomMIL(ZoomMILConfig.from_dict(dict(config)), warn_random_encoder=False)


def _named(name: str):
    def factory() -> ZoomMIL:
        """A fresh model of this named configuration."""
        return ZoomMIL(ZOOMMIL_CONFIGS[name])

    factory.__name__ = f"build_{name.replace('-', '_')}"
    return factory


def _training_task(model: ZoomMIL, options: Any, device: Any):
    from . import training

    return training.ZoomMILTask(model, options, device)


def _steps(model: ZoomMIL) -> int:
    return int(model.config.steps)


FAMILY = register_family(
    Family(
        architecture=ZoomMIL.architecture,
        config_class=ZoomMILConfig,
        build=_from_dict,
        configs={name: _named(name) for name in ZOOMMIL_CONFIGS},
        magnify=magnify_zoommil,
        training_task=_training_task,
        adjustable_patches=False,
        expected_steps=_steps,
        train_options=TRAIN_OPTIONS,
        order=30,
        description=(
            "ZoomMIL: learns which patches to zoom into across magnifications, over patch "
            "embeddings (ECCV 2022); abmil: gated-attention MIL baseline"
        ),
    ),
    overwrite=True,
)
