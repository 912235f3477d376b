"""Magnify results as napari layers (the conversions themselves live in :mod:`..io.layerdata`).

Every layer the plugin creates carries in its ``metadata``:

``slide_path``        the slide's file (str)
``slide_name``        its display name
``mpp``               ``(mpp_x, mpp_y)`` µm per level-0 pixel, or ``None`` (world = level-0 px)
``slide_dimensions``  level-0 ``(width, height)``
``napari_magnet``     ``{"kind": "rois" | "attention" | "coverage" | "annotations" |
                      "imported", "run": run id, "layer": magnifying layer, ...}``

Attention layers also carry ``box``: the level-0 ``(x0, y0, x1, y1)`` their pixels cover, so
the OME-TIFF writer places them exactly. Shapes are stored in world µm (layer scale 1), so a
shape's vertices are directly where it is drawn over the slide.

Design choices
--------------
* **One Image layer per magnifying layer** ("<slide> · L2 attention"). Layer 1 (and
  attention sampling) has one map: it is shown as it is. Deeper layers have one map per input
  region and those maps overlap (a frozen patch's frame is its parent's): they are combined
  (:func:`~napari_magnet.io.layerdata.composite_attention`: each map's attention mass rank,
  the maximum where maps overlap, on one grid over their union at the finest map
  resolution, at most 2048 pixels a side). One layer per map would add 10
  layers to a 3-layer MagNet run (28 to a 4-layer one) — each napari layer costs ~0.1–0.5 s of
  GUI time to add and a full garbage collection to remove — and bury the layer list. The
  per-map rasters stay available in *Export all* (``attention_L{layer}_{i}.ome.tif``).
* Maps are cut exactly to the slide and show their **attention mass rank**
  (:mod:`..io.attention_layers`: 1 = the most attended cell, 0.1 = the cells above hold 90 %
  of the map's attention): a trained model's attention is so peaked that a linear stretch
  shows one or two cells. Colours: viridis from teal to yellow (its dark purple end vanishes on
  haematoxylin), transparent below 0.1 so the tissue the model ignored is left untouched,
  then 60 → 100 % opaque; translucent blending. Additive blending — the usual choice for
  overlays on dark fluorescence images — washes a brightfield slide out to white (white glass
  + any colour = white), so it is not used. The topmost visible attention layer shows
  napari's colour bar (the scale is the same for all: :func:`~.roi_display.update_colorbars`).
* ROI labels: each magnifying layer labels another corner of its boxes (layer 1 above the
  upper left one, layer 2 below the lower right one, …), smaller with depth;
  :func:`~.roi_display.layout_labels` hides (transparent text) the labels of ROIs too small
  on screen and any label that would print over one shown before it, again at every zoom.
  Hovering an ROI puts its id, layer, attention mass, pyramid level and probabilities in the
  status bar's help field (:func:`~.roi_display.install_roi_display`). Edges are never wider
  than a fraction of their box, so a region a few pixels wide stays a thin outline.
* The coverage layer names its colours in the canvas's text overlay while it is shown.
* Stacking: the slide, its coverage, the attention overlays (layer 1 below layer 2 …), then
  the ROI layers above every overlay (a deeper layer's maps cover its parents' boxes, so an
  overlay above layer 1's outlines would hide them), then the user's annotations on top. ROI
  outlines are opaque, in lineage hues apart from the overlays' viridis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..io.coverage import coverage_legend
from ..io.layerdata import (
    UNEXAMINED,
    AttentionLayerData,
    attention_layer_data,
    coverage_colors,
    coverage_placement,
    review_style,
    shapes_box_level0,
)
from ..io.roi_columns import label_anchor, label_size
from .layer_kinds import (  # noqa: F401  (re-exported: the layer helpers' old home)
    KEY,
    TEXT_COLOR,
    base_name,
    is_slide_layer,
    layer_info,
    layer_kind,
    layers_of,
    slide_layers,
    slide_path_of,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

ATTENTION_OPACITY = 0.9
ATTENTION_BLENDING = "translucent"
#: Attention mass rank under which an attention layer is transparent (the least attended
#: cells that together hold 10 % of a map's attention).
ATTENTION_CUT = 0.1
#: Edges of an ROI are never wider than this fraction of its shorter side.
MAX_EDGE_FRACTION = 0.15


def attention_colormap() -> Any:
    """The colormap of attention layers (their values: attention mass rank in [0, 1]).

    Returns
    -------
    napari.utils.Colormap
        Transparent below :data:`ATTENTION_CUT`; above it viridis from teal (0.25) to yellow,
        60 % opaque rising to fully opaque at the most attended cells.
    """
    from napari.utils.colormaps import AVAILABLE_COLORMAPS, Colormap

    t = np.linspace(0.0, 1.0, 48)
    colors = np.asarray(AVAILABLE_COLORMAPS["viridis"].map(0.25 + 0.75 * t), float)
    colors[:, 3] = 0.6 + 0.4 * t
    clear = np.array([[*colors[0, :3], 0.0]] * 2)
    controls = np.concatenate(
        [[0.0, ATTENTION_CUT - 1e-4], ATTENTION_CUT + (1 - ATTENTION_CUT) * t]
    )
    return Colormap(
        colors=np.vstack([clear, colors]),
        controls=controls,
        name="napari-magnet attention",
        display_name="attention mass rank (viridis, clear below 0.1)",
    )


def selected_box(viewer: napari.Viewer, slide_layer: Any) -> tuple | None:
    """Level-0 ``(x0, y0, x1, y1)`` box of the shapes selected in a Shapes layer that is not
    an ROI layer (the active layer first), or ``None`` when none is selected.

    World µm → level-0 pixels through both layers' scale and translate.
    """
    from napari.layers import Shapes

    active = viewer.layers.selection.active
    order = [active] + [lyr for lyr in reversed(viewer.layers) if lyr != active]
    for layer in order:
        if not isinstance(layer, Shapes) or layer_kind(layer) == "rois":
            continue
        selected = sorted(i for i in (layer.selected_data or ()) if i < layer.nshapes)
        if not selected:
            continue
        verts = np.concatenate([np.asarray(layer.data[i])[:, -2:] for i in selected])
        return shapes_box_level0(
            verts,
            tuple(layer.scale)[-2:],
            tuple(layer.translate)[-2:],
            tuple(slide_layer.scale)[-2:],
            tuple(slide_layer.translate)[-2:],
        )
    return None


# --------------------------------------------------------------------------------------------
# metadata and sizes
# --------------------------------------------------------------------------------------------


def slide_metadata(slide_layer: Any, kind: str, **info: Any) -> dict:
    """Metadata for a layer of ours over ``slide_layer`` (see the module docstring)."""
    meta = slide_layer.metadata
    slide = meta["slide"]
    mpp = meta.get("mpp")
    return {
        "slide_path": str(meta.get("path")),
        "slide_name": slide_layer.name,
        "mpp": tuple(float(v) for v in mpp) if mpp else None,
        "slide_dimensions": tuple(int(v) for v in slide.dimensions),
        KEY: {"kind": kind, **info},
    }


def units_of(slide_layer: Any) -> tuple | None:
    """The slide layer's units, to give our layers the same."""
    try:
        return tuple(slide_layer.units)
    except AttributeError:  # pragma: no cover - older napari
        return None


def edge_width_for(slide_layer: Any) -> float:
    """A base edge width (world units) that reads well when the whole slide is in view."""
    meta = slide_layer.metadata
    width, height = meta["slide"].dimensions
    mx, my = meta.get("mpp") or (1.0, 1.0)
    return max(width * mx, height * my) / 450.0


def _kwargs_units(slide_layer: Any) -> dict:
    units = units_of(slide_layer)
    return {"units": units} if units else {}


# --------------------------------------------------------------------------------------------
# ROI and attention layers
# --------------------------------------------------------------------------------------------


def restyle(layer: Any, class_colors: dict | None = None) -> None:
    """Colour a Shapes layer of ours by class and review state (io.layerdata.review_style):
    ROIs keep their lineage colour until classified; accepted = bold, rejected = thin grey.
    An ROI's edge is never wider than :data:`MAX_EDGE_FRACTION` of its shorter side."""
    n = layer.nshapes
    if n == 0:
        return
    feats = layer.features
    classes = [
        str(c) if isinstance(c, str) else ""
        for c in (feats["class"] if "class" in feats else [""] * n)
    ]
    reviews = list(feats["review"]) if "review" in feats else ["unreviewed"] * n
    base = None
    if layer_kind(layer) == "rois" and "id" in feats:
        from ..io.geojson import branch_color

        base = np.array([[*(c / 255.0 for c in branch_color(str(r))), 1.0] for r in feats["id"]])
    elif "color" in layer_info(layer):
        base = np.asarray(layer_info(layer)["color"], dtype=float)
        if base.ndim != 2 or len(base) != n:
            base = None
    edges, faces, widths = review_style(classes, reviews, class_colors, base)
    if layer_kind(layer) == "rois":
        faces[:] = 0.0  # ROIs stay unfilled: the tissue under them is what is reviewed
    w0 = float(layer_info(layer).get("edge_width", 1.0))
    widths = w0 * widths
    if layer_kind(layer) == "rois":  # a region a few pixels wide: a hairline, not a blob
        sides = np.array([np.ptp(np.asarray(v)[:, -2:], axis=0).min() for v in layer.data])
        widths = np.minimum(widths, MAX_EDGE_FRACTION * sides)
    layer.edge_color = edges
    layer.face_color = faces
    layer.edge_width = list(widths)


def roi_layer_text(layer_no: int) -> dict:
    """The ``text`` settings of the ROI layers of a magnifying layer (live and reopened).

    Parameters
    ----------
    layer_no : int
        The 1-based magnifying layer.

    Returns
    -------
    dict
        The id as label, at the layer's corner and in its size
        (:func:`~napari_magnet.io.roi_columns.label_anchor`,
        :func:`~napari_magnet.io.roi_columns.label_size`), in :data:`TEXT_COLOR`.
    """
    return {
        "string": "{id}",
        "size": label_size(layer_no),
        "color": TEXT_COLOR,
        "anchor": label_anchor(layer_no),
    }


def roi_layer_name(slide_layer: Any, layer_no: int) -> str:
    return f"{slide_layer.name} · L{int(layer_no)} ROIs"


def set_roi_probability(layer: Any, probability: float | None) -> None:
    """Record the run's slide probability in an ROI layer's ``probability`` feature (the
    result arrives after the ROI layers; hovering an ROI then shows it).

    Parameters
    ----------
    layer : napari.layers.Shapes
        An ROI layer of the run.
    probability : float or None
        The run's slide probability (``None``: unknown, NaN).
    """
    if not layer.nshapes:
        return
    features = layer.features.copy()
    features["probability"] = np.nan if probability is None else float(probability)
    layer.features = features


def attention_layer_name(slide_layer: Any, layer_no: int) -> str:
    return f"{slide_layer.name} · L{int(layer_no)} attention"


def add_roi_layer(
    viewer: napari.Viewer,
    slide_layer: Any,
    rects: Sequence[np.ndarray],
    features: dict,
    layer_no: int,
    run: Any,
    *,
    committed: bool = False,
    name: str | None = None,
) -> Any:
    """Add one Shapes layer of rectangles (world µm) with the ROI features table."""
    w0 = edge_width_for(slide_layer)
    meta = slide_metadata(
        slide_layer, "rois", run=run, layer=int(layer_no), committed=committed, edge_width=w0
    )
    layer = viewer.add_shapes(
        list(rects) if len(rects) else None,
        shape_type="rectangle",
        features=features,
        edge_width=w0,
        face_color=[0, 0, 0, 0],
        opacity=1.0,  # outlines in their own colour (faces are transparent anyway)
        text=roi_layer_text(layer_no),
        name=name or roi_layer_name(slide_layer, layer_no),
        metadata=meta,
        **_kwargs_units(slide_layer),
    )
    restyle(layer)
    from .roi_display import install_roi_display

    install_roi_display(viewer)  # labels laid out, hover described
    return layer


def add_attention_layer(
    viewer: napari.Viewer,
    slide_layer: Any,
    placed: AttentionLayerData,
    layer_no: int,
    run: Any,
    n_maps: int = 1,
) -> Any:
    """One Image layer with a magnifying layer's attention (see the module docstring)."""
    meta = slide_metadata(
        slide_layer,
        "attention",
        run=run,
        layer=int(layer_no),
        maps=int(n_maps),
        composite=n_maps > 1,
    )
    meta["box"] = tuple(float(v) for v in placed.box)
    layer = viewer.add_image(
        placed.data,
        name=attention_layer_name(slide_layer, layer_no),
        scale=placed.scale,
        translate=placed.translate,
        colormap=attention_colormap(),
        blending=ATTENTION_BLENDING,
        opacity=ATTENTION_OPACITY,
        contrast_limits=placed.contrast_limits,
        metadata=meta,
        **_kwargs_units(slide_layer),
    )
    colorbar = getattr(layer, "colorbar", None)  # napari >= 0.6
    if colorbar is not None:
        colorbar.size = (14, 110)
    from .roi_display import install_roi_display

    install_roi_display(viewer)  # one colour bar: the topmost visible attention layer's
    return layer


# --------------------------------------------------------------------------------------------
# coverage
# --------------------------------------------------------------------------------------------


def coverage_layer_name(slide_layer: Any) -> str:
    return f"{slide_layer.name} · coverage"


def set_coverage_layer(
    viewer: napari.Viewer,
    slide_layer: Any,
    coverage: np.ndarray,
    n_layers: int,
    run: Any,
    existing: Any = None,
    visible: bool = False,
) -> Any:
    """Show (or update) the coverage grid as a Labels layer just above the slide.

    Values: ``k`` = the deepest magnifying layer that looked at the tissue there, red
    (:data:`~napari_magnet.io.layerdata.UNEXAMINED`) = tissue never examined, 0 = glass.
    Hidden by default (toggle its eye in the layer list): the result line reports the
    examined fraction.
    """
    from napari.utils.colormaps import DirectLabelColormap

    colors = coverage_colors(n_layers)
    cmap = DirectLabelColormap(color_dict={**colors, None: (0.0, 0.0, 0.0, 0.0)})
    if existing is not None and existing in viewer.layers:
        existing.data = coverage
        existing.colormap = cmap
        existing.metadata[KEY]["legend"] = coverage_legend(n_layers)
        from .roi_display import refresh

        refresh(viewer)
        return existing
    meta_slide = slide_layer.metadata
    dims = meta_slide["slide"].dimensions
    scale, translate = coverage_placement(dims, coverage.shape, meta_slide.get("mpp"))
    features = {
        "index": [0, *range(1, n_layers + 1), UNEXAMINED],
        "looked at by": [
            "glass",
            *(f"layer {k}" for k in range(1, n_layers + 1)),
            "tissue never examined",
        ],
    }
    layer = viewer.add_labels(
        coverage,
        name=coverage_layer_name(slide_layer),
        scale=scale,
        translate=translate,
        opacity=0.45,
        colormap=cmap,
        features=features,
        visible=visible,
        metadata=slide_metadata(slide_layer, "coverage", run=run, legend=coverage_legend(n_layers)),
        **_kwargs_units(slide_layer),
    )
    # just above its slide
    try:
        target = viewer.layers.index(slide_layer) + 1
        viewer.layers.move(viewer.layers.index(layer), target)
    except ValueError:  # pragma: no cover - slide removed meanwhile
        pass
    from .roi_display import install_roi_display

    install_roi_display(viewer)  # the legend shows while the layer does
    return layer


# --------------------------------------------------------------------------------------------
# reopening exported attention maps
# --------------------------------------------------------------------------------------------


def attention_map_layer_tuple(amap: Any, path: str = "") -> tuple:
    """Layer tuple of an :class:`~napari_magnet.io.ome.AttentionMap` read from OME-TIFF,
    placed in µm when the file records the slide's mpp (level-0 pixels otherwise)."""
    placed = attention_layer_data(amap.array, amap.box, amap.mpp)
    meta = {
        "slide_path": None,
        "mpp": tuple(amap.mpp) if amap.mpp else None,
        "box": tuple(float(v) for v in placed.box),
        "path": str(path),
        KEY: {"kind": "attention", "run": "file"},
    }
    kwargs = {
        "name": amap.name or "attention",
        "scale": placed.scale,
        "translate": placed.translate,
        "colormap": attention_colormap(),
        "blending": ATTENTION_BLENDING,
        "opacity": ATTENTION_OPACITY,
        "contrast_limits": placed.contrast_limits,
        "metadata": meta,
    }
    if amap.mpp:
        kwargs["units"] = ("µm", "µm")
    return (placed.data, kwargs, "image")
