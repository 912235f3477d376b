"""npe2 readers of our exports: GeoJSON annotations (ours and QuPath's) and attention OME-TIFF.

GeoJSON
-------
A reader cannot see the viewer, so it cannot know which slide a file belongs to. The shapes
are returned in **level-0 pixels** (row = y, col = x) and the layer's ``scale`` carries the
units:

* our files (written by the plugin's writer, autosave or *Export all*) record the slide's mpp
  in every feature's ``properties.napari_magnet.mpp``: ``scale = (mpp_y, mpp_x)``, so the
  shapes land on the slide in µm, exactly where they were drawn;
* QuPath's files carry no mpp: ``scale = (1, 1)``, units "level-0 pixel" (recorded in the
  metadata); to place them on a slide shown in µm use the Magnify widget's **Import GeoJSON…**,
  which knows the slide (and checks the coordinates against its size).

Classes and review states become the ``class``/``review`` features (styled like the
Annotations layer); a file without area annotations or a bad file raises
:class:`~napari_magnet.io.annotation.GeoJSONError` with the file name and the problem, which
napari shows as an error notification; nothing is added.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..io.annotation import GeoJSONError
from ..io.colors import review_style
from ..io.geojson_read import load_geojson
from ..io.shapes import annotations_to_shapes, recorded_mpp
from .layers import KEY, attention_map_layer_tuple

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


def geojson_layer_tuple(path: str) -> tuple:
    """Read a GeoJSON file into a Shapes layer tuple (see the module docstring).

    Parameters
    ----------
    path : str
        The file.

    Returns
    -------
    tuple
        ``(data, kwargs, "shapes")``: level-0 ``(row, col)`` vertices, the layer's
        arguments (features, colours, scale in µm when the file records the slide's mpp).

    Raises
    ------
    GeoJSONError
        For a bad file, or one without area annotations.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load_geojson(path)
    annotations = result.annotations
    if not annotations:
        raise GeoJSONError(f"{path}: no area annotations in the file")
    mpp = recorded_mpp(annotations)
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
    spans = [np.ptp(np.asarray(d), axis=0).max() for d in shapes.data]
    w0 = max(max(spans) / 150.0 if spans else 1.0, 1.0)  # level-0 px
    meta = {
        "mpp": mpp,
        "slide_path": None,
        "source": str(path),
        "skipped": list(result.skipped) + [str(w.message) for w in caught],
        KEY: {
            "kind": "imported",
            "units": "µm" if mpp else "level-0 pixel",
            "edge_width": w0,
            "color": base.tolist(),
        },
    }
    kwargs = {
        "name": Path(path).name.removesuffix(".geojson"),
        "shape_type": shapes.shape_types,
        "features": shapes.features,
        "edge_color": edges,
        "face_color": faces,
        "edge_width": list(w0 * widths),
        "scale": (mpp[1], mpp[0]) if mpp else (1.0, 1.0),
        "metadata": meta,
    }
    if mpp:
        kwargs["units"] = ("µm", "µm")
    return (shapes.data, kwargs, "shapes")


def read_geojson_layers(path: str | list[str]) -> list[tuple]:
    """npe2 reader of GeoJSON files.

    Parameters
    ----------
    path : str or list of str
        What napari asks about: one path, or a list holding one.

    Returns
    -------
    list of tuple
        One Shapes layer tuple (:func:`geojson_layer_tuple`).
    """
    return [geojson_layer_tuple(_single(path) or "")]


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
