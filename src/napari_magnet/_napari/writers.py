"""npe2 writers: Shapes → QuPath GeoJSON, attention Image layers → OME-TIFF.

Coordinates: a layer's vertices go data → world with the layer's ``scale``/``translate``, then
world µm → level-0 pixels with the slide's mpp taken from the layer's ``metadata["mpp"]``
(every layer the plugin makes carries it). For a Shapes layer without it — drawn by hand in a
new layer, or opened from an empty GeoJSON file, which has no mpp to record — the mpp of the
current viewer's only slide layer is used; with none (or several), world units are written as
level-0 pixels and a warning says so.

Every feature written records ``properties.napari_magnet.mpp`` so our GeoJSON reader can put
the shapes back in µm; QuPath ignores the key.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..io.annotation import GeoJSONError
from ..io.attention_layers import attention_box_from_layer
from ..io.geojson_write import write_geojson
from ..io.ome import write_attention_ome_tiff
from ..io.shapes import shapes_to_annotations
from .layers import KEY

GEOJSON_SUFFIXES = (".geojson", ".json")
OME_SUFFIXES = (".ome.tif", ".ome.tiff")


def _viewer_slide_mpp() -> tuple[tuple[float, float] | None, bool]:
    """(mpp of the current viewer's single slide layer, whether one was found)."""
    try:
        import napari

        from .layers import slide_layers

        viewer = napari.current_viewer()
    except Exception:  # noqa: BLE001 - no viewer, no Qt: fall back below
        return None, False
    if viewer is None:
        return None, False
    slides = slide_layers(viewer)
    if len(slides) != 1:
        return None, False
    mpp = slides[0].metadata.get("mpp")
    return (tuple(mpp) if mpp else None), True


def _with_suffix(path: str, suffixes: tuple[str, ...]) -> str:
    return path if path.lower().endswith(suffixes) else path + suffixes[0]


def write_shapes_geojson(path: str, data: Any, attributes: dict) -> list[str]:
    """Write one Shapes layer as a QuPath GeoJSON FeatureCollection (level-0 pixels).

    Rectangles and polygons are written as they are, ellipses as 64-gons; lines and paths
    (no area) are skipped with a warning. Classes, review states and — for ROI layers —
    lineage and measurements go into the features' properties (see :mod:`..io.geojson`;
    ROI layers are read through :meth:`~napari_magnet.io.rois.RoiTable.from_layer`).

    Parameters
    ----------
    path : str
        The file (``.geojson`` is appended unless it ends in ``.geojson`` or ``.json``).
    data : list of np.ndarray
        The layer's vertices (data coordinates).
    attributes : dict
        The layer's attributes as npe2 passes them: ``metadata``, ``shape_type``,
        ``features``, ``scale``, ``translate``.

    Returns
    -------
    list of str
        The written path.

    Raises
    ------
    GeoJSONError
        When the layer holds only lines and paths, or a shape cannot be written.
    """
    path = _with_suffix(str(path), GEOJSON_SUFFIXES)
    meta = dict(attributes.get("metadata") or {})
    if "mpp" in meta:
        mpp = meta["mpp"]
    else:
        mpp, found = _viewer_slide_mpp()
        if not found:
            warnings.warn(
                f"{path}: the Shapes layer has no slide mpp in its metadata and the "
                "viewer has not exactly one slide; writing world units as level-0 "
                "pixels",
                UserWarning,
                stacklevel=2,
            )
    info = meta.get(KEY) if isinstance(meta.get(KEY), dict) else {}
    kind = "roi" if info.get("kind") == "rois" else "annotation"
    shape_types = attributes.get("shape_type") or ["polygon"] * len(data)
    if isinstance(shape_types, str):
        shape_types = [shape_types] * len(data)
    annotations, skipped = shapes_to_annotations(
        list(data),
        list(shape_types),
        attributes.get("features"),
        mpp,
        scale=tuple(attributes.get("scale", (1.0, 1.0))),
        translate=tuple(attributes.get("translate", (0.0, 0.0))),
        kind=kind,
        slide_name=str(meta.get("slide_name", "")),
    )
    if skipped:
        warnings.warn(
            f"{path}: skipped {len(skipped)} shape(s) without area ({'; '.join(skipped[:5])})",
            UserWarning,
            stacklevel=2,
        )
    if not annotations and skipped:
        raise GeoJSONError(f"{path}: nothing to write: the layer holds only lines/paths")
    write_geojson(path, annotations)
    return [path]


def write_attention_ome(path: str, data: Any, attributes: dict) -> list[str]:
    """Write an attention-map Image layer as an OME-TIFF placed on the slide (io.ome).

    Only layers the plugin made (or read back) as attention maps are accepted: other images
    — the slide itself above all — are refused.

    Parameters
    ----------
    path : str
        The file (``.ome.tif`` is appended unless it ends in ``.ome.tif`` or ``.ome.tiff``).
    data : array-like
        The layer's 2-D map.
    attributes : dict
        The layer's attributes as npe2 passes them: ``metadata`` (``box``, ``mpp``),
        ``scale``, ``translate``, ``name``.

    Returns
    -------
    list of str
        The written path.

    Raises
    ------
    ValueError
        For a layer that is not one of our attention maps, or not a 2-D single image.
    """
    path = _with_suffix(str(path), OME_SUFFIXES)
    meta = dict(attributes.get("metadata") or {})
    info = meta.get(KEY) if isinstance(meta.get(KEY), dict) else {}
    if info.get("kind") != "attention" and "box" not in meta:
        raise ValueError(
            f"{path}: only napari-magnet attention-map layers can be written as "
            f"attention OME-TIFF ('{attributes.get('name', '')}' is not one)"
        )
    if attributes.get("multiscale") or attributes.get("rgb"):
        raise ValueError(f"{path}: an attention map is a single 2-D float image")
    array = np.asarray(data)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D map, got shape {array.shape}")
    mpp = meta.get("mpp")
    box = meta.get("box")
    if box is None:
        box = attention_box_from_layer(
            array.shape, attributes.get("scale", (1, 1)), attributes.get("translate", (0, 0)), mpp
        )
    write_attention_ome_tiff(
        path,
        array,
        tuple(box),
        tuple(mpp) if mpp else None,
        name=str(attributes.get("name", "attention")),
    )
    return [str(Path(path))]
