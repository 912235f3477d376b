"""What *Export all* writes, gathered from the viewer into one frozen record (no Qt).

:func:`collect_export` reads a slide's last run, its ROI layers (classes and review states)
and the user's annotations; :func:`write_export` hands them to
:func:`napari_magnet.io.results.export_run`, which writes every file (rois.geojson with the
review states included).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .annotations import layer_annotations
from .layer_kinds import is_kept
from .layers import layers_of, slide_path_of


@dataclass(frozen=True)
class ExportRecord:
    """One slide's results, as *Export all* writes them.

    Attributes
    ----------
    slide_path : str
        The slide's file.
    mpp : (float, float) or None
        Level-0 µm per pixel.
    steps : tuple of MagnifyStep
        The last committed run's steps (empty without a run).
    result : MagnifyResult or None
        Its result.
    annotations : tuple of Annotation
        The user's shapes (Annotations and imported layers).
    review_states : mapping of str to (str, str)
        ROI id → (class, review state), from the ROI layers.
    roi_annotations : tuple of Annotation
        The ROI layers' shapes when there are no steps (e.g. ROIs restored from the
        autosave); empty otherwise (the steps are the ROIs then).
    """

    slide_path: str
    mpp: tuple[float, float] | None
    steps: tuple = ()
    result: Any = None
    annotations: tuple = ()
    review_states: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    roi_annotations: tuple = ()


def roi_review_states(roi_layers: list) -> dict[str, tuple[str, str]]:
    """ROI id → (class, review state) over ``roi_layers``' features."""
    states: dict[str, tuple[str, str]] = {}
    for layer in roi_layers:
        feats = layer.features
        for rid, klass, review in zip(feats["id"], feats["class"], feats["review"]):
            states[str(rid)] = (str(klass or ""), str(review))
    return states


def collect_export(viewer: Any, slide_layer: Any, run: Any = None) -> ExportRecord:
    """Gather what *Export all* writes for ``slide_layer``.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer holding the slide's layers.
    slide_layer : napari.layers.Image
        The slide.
    run : MagnifyRun, optional
        Its last committed run.
    """
    slide_path = str(slide_path_of(slide_layer))
    mpp = slide_layer.metadata.get("mpp")
    annotations = [
        a
        for layer in layers_of(viewer, slide_path, kinds=("annotations", "imported"))
        for a in layer_annotations(layer)
    ]
    # the last run's ROIs: layers kept for their reviews hold an earlier run's (same ids)
    roi_layers = [lyr for lyr in layers_of(viewer, slide_path, kinds=("rois",)) if not is_kept(lyr)]
    steps = tuple(run.steps) if run is not None else ()
    return ExportRecord(
        slide_path=slide_path,
        mpp=(float(mpp[0]), float(mpp[1])) if mpp else None,
        steps=steps,
        result=run.result if run is not None else None,
        annotations=tuple(annotations),
        review_states=roi_review_states(roi_layers),
        roi_annotations=()
        if steps
        else tuple(a for layer in roi_layers for a in layer_annotations(layer)),
    )


def write_export(record: ExportRecord, folder: str | Path) -> list[Path]:
    """Write ``record`` into ``folder`` with :func:`~napari_magnet.io.results.export_run`:
    rois.geojson (with the reviewer's classes and review states), annotations.geojson,
    attention_L*.ome.tif and result.json.

    Returns
    -------
    list of Path
        The files written.
    """
    from ..io.results import export_run

    return export_run(
        folder,
        record.slide_path,
        record.mpp,
        list(record.steps),
        record.result,
        list(record.annotations),
        review_states=dict(record.review_states),
        roi_annotations=list(record.roi_annotations),
    )
