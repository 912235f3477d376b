"""Attention sampling (Katharopoulos & Fleuret, ICML 2019; the lymphoma talk 2023) — DESIGN §5.

A small attention network looks at a downscaled *view* of the slide and produces a probability
distribution over its positions; ``N`` positions are sampled from it, each is read as a
high-resolution patch from the pyramid, a feature network embeds every patch, and the
attention-weighted mean of the features (estimated from the samples, see
:mod:`napari_magnet.models.ats.estimators`) is classified.

Shapes and coordinates (the contract with the engine)
-----------------------------------------------------
``view``
    ``(B, 3, h, w)`` float RGB in ``[0, 1]``: the whole slide (or region) resized, aspect
    preserved, so that its longer side is ``config.view_size`` (the model accepts any ``h, w``).
``attention``
    ``(B, h', w')`` probabilities summing to 1 over all positions. The convolutions are padded
    ("same"), so ``(h', w') == (h, w)``: attention position ``(r, c)`` is view pixel ``(r, c)``.
``indices``
    ``(B, n)`` int64 flat positions ``r * w' + c`` **in sampling order** (first drawn first).
``centres``
    ``(B, n, 2)`` patch centres as ``(x, y)`` in view-normalised coordinates ``[0, 1]``:
    ``x = (c + 0.5) / w'``, ``y = (r + 0.5) / h'`` — the centre of the view pixel (the attention
    grid spans the view uniformly). The engine maps ``(x, y)`` to level 0 by multiplying with the
    level-0 width/height of the area the view shows (plus its level-0 offset).
``read_patches(centres) -> patches``
    Engine-supplied: ``(B * n, 3, P, P)`` float RGB in ``[0, 1]``, batch-major (row
    ``b * n + i`` is draw ``i`` of slide ``b``), each centred on its centre and read at
    ``config.patch_level_scale`` level-0 pixels per patch pixel, i.e. covering
    ``P * patch_level_scale`` level-0 pixels (4.0 ≈ 10× objective for a 40× scan). The engine
    picks the pyramid level and resamples; out-of-slide parts are padded (white or black — the
    model does not care as long as training and inference agree).
``logits``
    ``(B, n_classes)``; ``probabilities`` are their softmax.

Two levels (``config.two_level``): the view's attention picks ``N1`` *regions* (read at
``region_size`` pixels, ``region_level_scale`` level-0 pixels each); a second attention network
looks at every region and ``N2 = n_patches`` patches are drawn inside each, with centres
region-normalised the same way. See :meth:`AttentionSampling.classify_two_level`.

One pipeline (:meth:`AttentionSampling.forward`: attention → mask outside the slide → sample →
read → classify) serves both callers; they differ only in the reader callbacks they hand it
(:class:`SlideReads`): a Magnify run (:func:`magnify_attention_sampling`) reads one slide,
a training step (:class:`ATSTask`) a batch of augmented slides.

The model (:mod:`.model`) imports torch only; the readers and callers use the engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..family import Family, register_family
from .config import ATS_CONFIGS, ATSConfig, ats_config
from .magnify import magnify_attention_sampling
from .model import ATSOutput, AttentionNet, AttentionSampling, FeatureNet, build_ats, gumbel_top_k
from .reads import SlideReads
from .training import TRAIN_OPTIONS, ATSTask

__all__ = [
    "ATS_CONFIGS",
    "FAMILY",
    "ATSConfig",
    "ATSOutput",
    "ATSTask",
    "AttentionNet",
    "AttentionSampling",
    "FeatureNet",
    "ats_config",
    "build_ats",
    "gumbel_top_k",
    "SlideReads",
    "magnify_attention_sampling",
]


def _from_dict(config: Mapping[str, Any]) -> AttentionSampling:
    return AttentionSampling(ATSConfig.from_dict(dict(config)))


def _named(name: str):
    def factory() -> AttentionSampling:
        """A fresh model of this named configuration."""
        return AttentionSampling(ATS_CONFIGS[name]())

    factory.__name__ = f"build_{name.replace('-', '_')}"
    return factory


def _steps(model: AttentionSampling) -> int:
    return 2 if model.config.two_level else 1


FAMILY = register_family(
    Family(
        architecture=AttentionSampling.architecture,
        config_class=ATSConfig,
        build=_from_dict,
        configs={name: _named(name) for name in ATS_CONFIGS},
        magnify=magnify_attention_sampling,
        training_task=ATSTask,
        adjustable_patches=True,
        expected_steps=_steps,
        train_options=TRAIN_OPTIONS,
        order=20,
        description="attention sampling: patches drawn where a low-resolution attention looks",
    ),
    overwrite=True,
)
