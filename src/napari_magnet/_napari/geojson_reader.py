"""npe2 readers of our exports: GeoJSON annotations (ours and QuPath's) and attention OME-TIFF.

GeoJSON
-------
A reader cannot see the viewer, so it cannot know which slide a file belongs to. Annotations
are returned in **level-0 pixels** (row = y, col = x) and the layer's ``scale`` carries the
units:

* our files (written by the plugin's writer, autosave or *Export all*) record the slide's mpp
  in every feature's ``properties.napari_magnet.mpp``: ``scale = (mpp_y, mpp_x)``, so the
  shapes land on the slide in µm, exactly where they were drawn;
* QuPath's files (and ``napari-magnet magnify --out``'s, which record no review) carry no
  mpp: ``scale = (1, 1)``, units "level-0 pixel" (recorded in the metadata); to place them on
  a slide shown in µm use the Magnify widget's **Import GeoJSON…**, which knows the slide
  (and checks the coordinates against its size).

One file gives one or more Shapes layers, in this order:

* the annotations (every feature that is not an ROI): one layer named after the file, kind
  ``"imported"``, classes and review states in its ``class``/``review`` features (styled like
  the Annotations layer);
* the ROIs (features recording ``properties.napari_magnet.region_id`` or ``"kind": "roi"``,
  as ``rois.geojson`` and the autosave write them): one ROI layer per magnifying layer,
  "<file> · L<k> ROIs", deeper layers above, built like the live ROI layers of a run — in
  world ``(row, col)`` (µm when the file records the mpp) at scale 1, with the same features
  table, lineage colours and id labels — so they can be reviewed and saved again without
  losing their lineage;
* a file with no features at all (an empty FeatureCollection, as *Export all* writes when
  there are no annotations) opens as one empty Shapes layer; it records no mpp, so shapes
  drawn in it are saved with the mpp of the viewer's slide (see :mod:`.writers`).

A file whose features are all points or lines, or a bad file, raises
:class:`~napari_magnet.io.annotation.GeoJSONError` with the file name and the problem, which
napari shows as an error notification; nothing is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io.annotation import PROPERTIES_KEY, Annotation
from ..io.colors import review_style
from ..io.geojson_read import load_geojson
from ..io.rois import RoiTable
from ..io.shapes import annotations_to_shapes, recorded_mpp
from .layers import KEY, attention_map_layer_tuple, restyle, roi_layer_text

GEOJSON_PATTERNS = (".geojson",)
OME_PATTERNS = (".ome.tif", ".ome.tiff")


def _single(path: str | list[str]) -> str | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return str(path)


def get_geojson_reader(path: str | list[str]):
    """npe2 reader hook for GeoJSON files.

    Parameters
    ----------
    path : str or list of str
        What napari asks about: one path, or a list holding one.

    Returns
    -------
    callable or None
        :func:`read_geojson_layers` for one existing ``*.geojson`` file, else ``None``.
    """
    p = _single(path)
    if p is None or not p.lower().endswith(GEOJSON_PATTERNS) or not Path(p).is_file():
        return None
    return read_geojson_layers


def _roi_layer_number(annotation: Annotation) -> int | None:
    """The magnifying layer of an ROI feature (0: unknown), ``None`` for a plain annotation."""
    ours = (
        annotation.properties.get(PROPERTIES_KEY)
        if isinstance(annotation.properties, dict)
        else None
    )
    if not isinstance(ours, dict) or not (ours.get("kind") == "roi" or "region_id" in ours):
        return None
    layer = ours.get("layer", 0)
    return int(layer) if isinstance(layer, (int, float)) and not isinstance(layer, bool) else 0


def _edge_width(outlines: Sequence[np.ndarray]) -> float:
    """A base edge width (the shapes' data units) that reads well over the file's shapes."""
    spans = [float(np.ptp(np.asarray(o, dtype=float), axis=0).max()) for o in outlines]
    return max(max(spans) / 150.0 if spans else 1.0, 1.0)


def _placement(mpp: tuple[float, float] | None) -> dict:
    """Layer ``scale`` (and ``units``) of level-0 ``(row, col)`` data."""
    if not mpp:
        return {"scale": (1.0, 1.0)}
    return {"scale": (mpp[1], mpp[0]), "units": ("µm", "µm")}


def _metadata(path: str, mpp: Any, skipped: list[str], info: dict) -> dict:
    return {
        "mpp": mpp,
        "slide_path": None,
        "path": str(path),
        "source": str(path),
        "skipped": list(skipped),
        KEY: {"units": "µm" if mpp else "level-0 pixel", **info},
    }


def _annotations_tuple(
    path: str, name: str, annotations: list[Annotation], mpp: Any, skipped: list[str]
) -> tuple:
    shapes = annotations_to_shapes(annotations, None)  # level-0 (row=y, col=x)
    n = len(shapes.data)
    class_colors = {
        a.classification: a.class_color for a in annotations if a.classification and a.class_color
    }
    base = np.array(
        [
            [*(c / 255.0 for c in a.color), 1.0] if a.color else [1.0, 0.85, 0.0, 1.0]
            for a in annotations
        ]
    ).reshape(n, 4)
    edges, faces, widths = review_style(
        shapes.features["class"], shapes.features["review"], class_colors, base
    )
    w0 = _edge_width(shapes.data)
    info = {"kind": "imported", "edge_width": w0, "color": base.tolist()}
    kwargs = {
        "name": name,
        "shape_type": shapes.shape_types,
        "features": shapes.features,
        "edge_color": edges,
        "face_color": faces,
        "edge_width": list(w0 * widths),
        "metadata": _metadata(path, mpp, skipped, info),
        **_placement(mpp),
    }
    return (shapes.data, kwargs, "shapes")


def _roi_tuple(
    path: str,
    name: str,
    annotations: list[Annotation],
    layer_no: int,
    mpp: Any,
    skipped: list[str],
    w0: float,
) -> tuple:
    """An ROI layer built as a run builds its live ones (:func:`~.layers.add_roi_layer`):
    world ``(row, col)`` (µm when the file records the mpp) at scale 1, the same features
    table, id labels (:func:`~.layers.roi_layer_text`) and styling (:func:`~.layers.restyle`);
    ``w0`` is the base edge width in world units, shared by the file's ROI layers."""
    from napari.layers import Shapes

    table = RoiTable.from_annotations(annotations)
    data = table.to_layer_data(mpp)
    info = {"kind": "rois", "run": "file", "layer": int(layer_no), "committed": True}
    meta = _metadata(path, mpp, skipped, {**info, "edge_width": w0})
    meta["slide_name"] = table.slide_name or ""
    layer = Shapes(
        data.rects,
        shape_type=data.shape_types,
        features=data.features,
        edge_width=w0,
        face_color=[0.0, 0.0, 0.0, 0.0],
        text=roi_layer_text(layer_no),
        name=f"{name} · L{layer_no} ROIs" if layer_no >= 1 else f"{name} · ROIs",
        metadata=meta,
        **({"units": ("µm", "µm")} if mpp else {}),
    )
    restyle(layer)
    return layer.as_layer_data_tuple()


def _empty_tuple(path: str, name: str, skipped: list[str]) -> tuple:
    meta = _metadata(path, None, skipped, {"kind": "imported"})
    del meta["mpp"]  # unknown: the writer falls back on the viewer's slide
    meta[KEY]["units"] = "world"
    empty = np.array([], dtype=object)
    kwargs = {
        "name": name,
        "ndim": 2,
        "features": {"class": empty, "review": empty.copy(), "name": empty.copy()},
        "feature_defaults": {"class": "", "review": "unreviewed", "name": ""},
        "metadata": meta,
    }
    return ([], kwargs, "shapes")


def geojson_layer_tuples(path: str) -> list[tuple]:
    """Read a GeoJSON file into Shapes layer tuples (see the module docstring).

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    list of tuple
        ``(data, kwargs, "shapes")`` each: the annotations' layer first (level-0
        ``(row, col)`` vertices, scale in µm when the file records the slide's mpp), then one
        ROI layer per magnifying layer (world vertices, as a run's); one empty layer for a
        file without features. The skipped features (points, lines) are listed in each
        layer's ``metadata["skipped"]``.

    Raises
    ------
    GeoJSONError
        For a bad file, or one whose features are all points or lines.
    """
    result = load_geojson(path)  # warns about nothing: skipped features are returned
    skipped = list(result.skipped)
    name = Path(path).name.removesuffix(".geojson")
    annotations = result.annotations
    if not annotations:
        return [_empty_tuple(path, name, skipped)]
    mpp = recorded_mpp(annotations)
    plain: list[Annotation] = []
    rois: dict[int, list[Annotation]] = {}
    for a in annotations:
        layer_no = _roi_layer_number(a)
        if layer_no is None:
            plain.append(a)
        else:
            rois.setdefault(layer_no, []).append(a)
    out = [_annotations_tuple(path, name, plain, mpp, skipped)] if plain else []
    if rois:
        # one edge width for every ROI layer, as a run's share the slide's (layers.py)
        boxes = np.array([a.bbox for group in rois.values() for a in group], dtype=float)
        extent = max(np.ptp(boxes[:, [0, 2]]), np.ptp(boxes[:, [1, 3]])) * (
            max(mpp) if mpp else 1.0
        )
        w0 = extent / 700.0 if extent > 0 else 1.0
        out += [_roi_tuple(path, name, rois[k], k, mpp, skipped, w0) for k in sorted(rois)]
    return out


def read_geojson_layers(path: str | list[str]) -> list[tuple]:
    """npe2 reader of GeoJSON files.

    Parameters
    ----------
    path : str or list of str
        What napari asks about: one path, or a list holding one.

    Returns
    -------
    list of tuple
        The file's Shapes layer tuples (:func:`geojson_layer_tuples`).
    """
    return geojson_layer_tuples(_single(path) or "")


# --------------------------------------------------------------------------------------------
# attention maps
# --------------------------------------------------------------------------------------------


def _is_attention_tiff(path: str) -> bool:
    try:
        import tifffile

        from ..io.ome import NAMESPACE

        with tifffile.TiffFile(path) as tf:
            text = (tf.ome_metadata or "") + (tf.pages.first.description or "")
    except Exception:  # noqa: BLE001 - detection must never raise
        return False
    return NAMESPACE in text


def get_attention_reader(path: str | list[str]):
    """npe2 reader hook for our attention-map OME-TIFFs.

    Parameters
    ----------
    path : str or list of str
        What napari asks about: one path, or a list holding one.

    Returns
    -------
    callable or None
        :func:`read_attention_layers` for our attention maps; other TIFFs are declined
        (``None``), so the slide reader gets them.
    """
    p = _single(path)
    if p is None or not p.lower().endswith(OME_PATTERNS) or not _is_attention_tiff(p):
        return None
    return read_attention_layers


def read_attention_layers(path: str | list[str]) -> list[tuple]:
    """npe2 reader of attention-map OME-TIFFs.

    Parameters
    ----------
    path : str or list of str
        What napari asks about: one path, or a list holding one.

    Returns
    -------
    list of tuple
        The map as one Image layer tuple at its place on the slide (in µm when the file
        records the slide's mpp).
    """
    from ..io.ome import read_attention_ome_tiff

    p = _single(path) or ""
    return [attention_map_layer_tuple(read_attention_ome_tiff(p), p)]
