"""Magnify results as viewer-layer data (pure numpy; no napari import).

:func:`step_layer_data` computes, off the GUI thread, everything the viewer shows for one
:class:`~napari_magnet.engine.types.MagnifyStep`: its ROIs (:class:`~.rois.RoiTable`), the
composite attention map (:mod:`.attention_layers`) and the coverage grid (:mod:`.coverage`).

The conversions themselves live in topic modules, whose public names this module gathers:

* :mod:`.coords` — level-0 pixels ``(x, y)`` ↔ napari world ``(row, col)`` µm (DESIGN §2);
* :mod:`.rois` — the ROI table and its Shapes-layer encoding;
* :mod:`.attention_layers` — attention maps placed on the slide;
* :mod:`.coverage` — which tissue each magnifying layer looked at, and which it never examined;
* :mod:`.shapes` — Shapes layers ↔ :class:`~.annotation.Annotation` records;
* :mod:`.colors` — the review styling of shapes (colours by class and review state).

``mpp`` arguments are ``(mpp_x, mpp_y)`` in µm per level-0 pixel, as :attr:`Slide.mpp` gives
them; ``None`` means the slide has no physical size and world units are level-0 pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .attention_layers import (
    AttentionLayerData,
    attention_box_from_layer,
    attention_layer_data,
    composite_attention,
)
from .colors import REJECTED_RGBA, WIDTH_FACTOR, review_style
from .coords import (
    box_to_world_rect,
    ellipse_polygon,
    level0_to_world,
    mpp_or_unit,
    shapes_box_level0,
    world_to_level0,
)
from .coverage import (
    UNEXAMINED,
    coverage_colors,
    coverage_grid_shape,
    coverage_map,
    coverage_placement,
    coverage_summary,
    resize_mask,
    tissue_mask,
)
from .rois import ROI_FEATURES, RoiLayerData, RoiTable
from .shapes import ShapesData, annotations_to_shapes, recorded_mpp, shapes_to_annotations

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine.types import MagnifyStep

__all__ = [
    "REJECTED_RGBA",
    "ROI_FEATURES",
    "UNEXAMINED",
    "WIDTH_FACTOR",
    "AttentionLayerData",
    "RoiLayerData",
    "ShapesData",
    "StepLayerData",
    "annotations_to_shapes",
    "attention_box_from_layer",
    "attention_layer_data",
    "box_to_world_rect",
    "composite_attention",
    "coverage_colors",
    "coverage_grid_shape",
    "coverage_map",
    "coverage_placement",
    "coverage_summary",
    "ellipse_polygon",
    "level0_to_world",
    "mpp_or_unit",
    "recorded_mpp",
    "resize_mask",
    "review_style",
    "shapes_box_level0",
    "shapes_to_annotations",
    "step_layer_data",
    "tissue_mask",
    "world_to_level0",
]


@dataclass
class StepLayerData:
    """Everything the viewer shows for one step, computed off the GUI thread.

    Attributes
    ----------
    layer : int
        The step's magnifying layer.
    rois : RoiLayerData
        The step's ROIs as Shapes-layer data.
    attention : AttentionLayerData
        The step's attention maps as one raster placed on the slide.
    n_maps : int
        How many attention maps ``attention`` combines.
    coverage : np.ndarray or None
        The coverage grid of the run so far (:func:`~.coverage.coverage_map`).
    """

    layer: int
    rois: RoiLayerData
    attention: AttentionLayerData
    n_maps: int
    coverage: np.ndarray | None = None


def step_layer_data(
    step: MagnifyStep,
    mpp: Sequence[float] | None,
    slide_dims: Sequence[int],
    steps_so_far: Sequence[MagnifyStep] = (),
    tissue: np.ndarray | None = None,
) -> StepLayerData:
    """The ROIs, the composite attention map and the coverage grid of one step.

    Parameters
    ----------
    step : MagnifyStep
        The step to show.
    mpp : (mpp_x, mpp_y) or None
        The slide's µm per level-0 pixel.
    slide_dims : (width, height)
        Level-0 size of the slide.
    steps_so_far : sequence of MagnifyStep
        The run's steps up to and including ``step``; the coverage grid is computed when
        given.
    tissue : np.ndarray, optional
        Boolean tissue mask whose shape is the coverage grid's.

    Returns
    -------
    StepLayerData
        The layer data, ready for the viewer.
    """
    coverage = None
    if steps_so_far:
        grid = tissue.shape if tissue is not None else coverage_grid_shape(slide_dims)
        coverage = coverage_map(steps_so_far, slide_dims, tissue, grid)
    return StepLayerData(
        layer=int(step.layer),
        rois=RoiTable.from_steps([step]).to_layer_data(mpp),
        attention=composite_attention(step.attention_maps, step.attention_boxes, mpp, slide_dims),
        n_maps=len(step.attention_maps),
        coverage=coverage,
    )
