"""One folder per Magnify run: ROIs, annotations, attention maps and a JSON summary (DESIGN §8).

:func:`export_run` writes::

    out_dir/
      rois.geojson                 the run's regions as rectangles (io.rois.RoiTable), with the
                                   reviewer's classes and review states when given
      annotations.geojson          the user's annotations (an empty FeatureCollection if none)
      attention_L{layer}_{i}.ome.tif   one per attention map (i: 0-based index within the layer)
      result.json                  MagnifyResult fields, config hash, slide, layer summary, files

Every file is written atomically (:mod:`.atomic`), so a crash never leaves a half-written
file; ``attention_L*_*.ome.tif`` files left in the folder by an earlier export
that this one did not rewrite are removed, so the folder always describes one run.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .annotation import Annotation
from .atomic import atomic_write_json, json_safe
from .geojson_write import write_geojson
from .ome import write_attention_ome_tiff
from .rois import RoiTable

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine.types import MagnifyResult, MagnifyStep

__all__ = [
    "RESULT_FORMAT",
    "attention_file_name",
    "export_run",
    "layer_summary",
    "run_rois",
    "write_result_json",
]

#: Value of ``"format"`` in result.json.
RESULT_FORMAT = "napari-magnet-result"
_RESULT_VERSION = 1
_RESERVED = ("format", "version", "created", "result", "config_hash", "layers")
_ATTENTION_RE = re.compile(r"^attention_L\d+_\d+\.ome\.tif$")


def attention_file_name(layer: int, index: int) -> str:
    """The file name of an attention map in a run's folder.

    Parameters
    ----------
    layer : int
        The magnifying layer.
    index : int
        0-based index of the map within the layer.

    Returns
    -------
    str
        ``attention_L{layer}_{index}.ome.tif``.
    """
    return f"attention_L{int(layer)}_{int(index)}.ome.tif"


def layer_summary(step: MagnifyStep) -> dict:
    """JSON-ready summary of one step, as result.json records it.

    Parameters
    ----------
    step : MagnifyStep
        The step.

    Returns
    -------
    dict
        ``layer``, ``n_regions``, ``aux_probability``, ``regions`` (id, parent id, box,
        level, attention mass, scale; ``null`` when unknown) and ``attention_maps`` (index,
        file, shape, box).
    """
    boxes = np.asarray(step.boxes, dtype=float).reshape(-1, 4)
    n = len(boxes)
    levels = np.asarray(step.levels).reshape(-1)
    mass = np.asarray(step.attention_mass, dtype=float).reshape(-1)
    scales = np.asarray(step.scales, dtype=float).reshape(-1)
    parents = list(step.parent_ids or [])
    att_boxes = np.asarray(step.attention_boxes, dtype=float).reshape(-1, 4)
    regions = []
    for i in range(n):
        regions.append(
            {
                "id": str(step.region_ids[i]) if i < len(step.region_ids) else "",
                "parent_id": str(parents[i]) if i < len(parents) else "",
                "box": boxes[i],
                "level": int(levels[i]) if len(levels) == n else None,
                "attention_mass": float(mass[i]) if len(mass) == n else None,
                "scale": float(scales[i]) if len(scales) == n else None,
            }
        )
    maps = []
    for i, amap in enumerate(step.attention_maps):
        maps.append(
            {
                "index": i,
                "file": attention_file_name(step.layer, i),
                "shape": list(np.shape(amap)),
                "box": att_boxes[i] if i < len(att_boxes) else None,
            }
        )
    return json_safe(
        {
            "layer": int(step.layer),
            "n_regions": n,
            "aux_probability": step.aux_probability,
            "regions": regions,
            "attention_maps": maps,
        }
    )


def write_result_json(
    path: str | os.PathLike,
    result: MagnifyResult | None,
    steps: Sequence[MagnifyStep] = (),
    extra: dict | None = None,
) -> Path:
    """Write ``result.json`` atomically.

    Keys: ``format`` (:data:`RESULT_FORMAT`), ``version``, ``created`` (UTC ISO time),
    ``result`` (the MagnifyResult fields, or ``null`` for a run stopped before its result),
    ``config_hash`` (the model's, from the result), ``layers`` (:func:`layer_summary` per step),
    then every key of ``extra``. Numpy values are converted and non-finite floats written as
    ``null`` (:func:`~.atomic.json_safe`).

    Parameters
    ----------
    path : path-like
        The file.
    result : MagnifyResult or None
        The run's result.
    steps : sequence of MagnifyStep
        The run's steps.
    extra : dict, optional
        More keys; they must not reuse the names above.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        When ``extra`` reuses a reserved key (nothing is written).
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} are reserved in result.json")
    doc: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "version": _RESULT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "result": result.to_dict() if result is not None else None,
        "config_hash": getattr(result, "config_hash", "") if result is not None else "",
        "layers": [layer_summary(s) for s in steps],
    }
    doc.update(extra)
    return atomic_write_json(path, doc, indent=2, ensure_ascii=False)


def run_rois(
    steps: Sequence[MagnifyStep],
    slide_name: str,
    slide_mpp: Sequence[float] | None,
    probability: float | None,
    *,
    review_states: Mapping[str, tuple[str, str]] | None = None,
    roi_annotations: Sequence[Annotation] | None = None,
) -> list[Annotation]:
    """The ROIs ``rois.geojson`` holds (see :func:`export_run`).

    Parameters
    ----------
    steps : sequence of MagnifyStep
        The run's steps; their regions are the ROIs.
    slide_name : str
        The slide's file name (recorded; it seeds the stable feature ids).
    slide_mpp : (mpp_x, mpp_y) or None
        Recorded on reviewed ROIs.
    probability : float or None
        The run's slide probability (a measurement of every ROI).
    review_states : mapping of str to (class, review state), optional
        By ROI id.
    roi_annotations : sequence of Annotation, optional
        ROIs read from the viewer's layers, used when there are no steps.

    Returns
    -------
    list of Annotation
        Unreviewed ROIs as the run made them when neither ``review_states`` nor
        ``roi_annotations`` is given; otherwise ROIs as the viewer saves them: with classes
        and review states, ``"kind": "roi"`` and the slide's mpp in
        ``properties.napari_magnet``.
    """
    reviewed = review_states is not None or roi_annotations is not None
    if steps or roi_annotations is None:
        table = RoiTable.from_steps(steps, slide_name=slide_name, probability=probability)
    else:
        table = RoiTable.from_annotations(roi_annotations)
    if review_states:
        table = table.with_review(review_states)
    return table.to_annotations(mpp=slide_mpp if reviewed else None, mark_as_roi=reviewed)


def export_run(
    out_dir: str | os.PathLike,
    slide_path: str | os.PathLike,
    slide_mpp: tuple[float, float] | None,
    steps: Sequence[MagnifyStep],
    result: MagnifyResult | None,
    annotations: Sequence[Annotation] | None = None,
    *,
    review_states: Mapping[str, tuple[str, str]] | None = None,
    roi_annotations: Sequence[Annotation] | None = None,
) -> list[Path]:
    """Export one Magnify run into ``out_dir`` (created if needed); see the module docstring.

    Parameters
    ----------
    out_dir : path-like
        Folder for the files.
    slide_path : path-like
        The slide the run looked at (recorded; its file name names the ROIs' slide).
    slide_mpp : (mpp_x, mpp_y) or None
        Level-0 µm per pixel, for the attention maps' physical sizes.
    steps : sequence of MagnifyStep
        The run's steps, in order.
    result : MagnifyResult or None
        The run's result (``None`` for a run stopped early: ``"result": null``).
    annotations : sequence of Annotation, optional
        The user's annotations for ``annotations.geojson``.
    review_states : mapping of str to (str, str), optional
        ROI id → (class, review state) set by a reviewer (``""`` = unclassified; ROIs not in
        it keep theirs: a run's regions are unclassified and unreviewed). When given (even
        empty), ``rois.geojson`` holds the ROIs as the viewer saves them: with those classes
        and states, and ``"kind": "roi"`` and the slide's ``mpp`` (when known) in
        ``properties.napari_magnet``.
    roi_annotations : sequence of Annotation, optional
        The ROIs when there are no ``steps`` (e.g. ROIs restored from an autosave, read from
        the viewer's layers): written the same way, ``review_states`` applied to them too.
        Ignored when there are steps.

    Returns
    -------
    list of Path
        The written paths in the order: rois.geojson, annotations.geojson, the attention
        maps, result.json.

    Raises
    ------
    ValueError
        When a step's attention maps and boxes disagree, or a review state is not one of
        :data:`~.annotation.REVIEW_STATES`; nothing is written then.
    """
    out = Path(out_dir)
    slide_path = Path(slide_path)
    slide_name = slide_path.name
    steps = list(steps)
    probability = float(result.probability) if result is not None else None
    written: list[Path] = []

    # check everything before writing anything
    for step in steps:
        n_boxes = len(np.asarray(step.attention_boxes, dtype=float).reshape(-1, 4))
        if n_boxes != len(step.attention_maps):
            raise ValueError(
                f"layer {step.layer}: {len(step.attention_maps)} attention maps but "
                f"{n_boxes} attention boxes"
            )
    rois = run_rois(
        steps,
        slide_name,
        slide_mpp,
        probability,
        review_states=review_states,
        roi_annotations=roi_annotations,
    )
    out.mkdir(parents=True, exist_ok=True)

    written.append(write_geojson(out / "rois.geojson", rois))
    written.append(write_geojson(out / "annotations.geojson", list(annotations or [])))

    for step in steps:
        att_boxes = np.asarray(step.attention_boxes, dtype=float).reshape(-1, 4)
        for i, amap in enumerate(step.attention_maps):
            written.append(
                write_attention_ome_tiff(
                    out / attention_file_name(step.layer, i),
                    np.asarray(amap),
                    tuple(att_boxes[i]),
                    slide_mpp,
                    name=f"{slide_name} attention layer {step.layer} map {i}",
                )
            )

    kept = {p.name for p in written}
    for stale in out.iterdir():
        if _ATTENTION_RE.match(stale.name) and stale.name not in kept and stale.is_file():
            stale.unlink()

    extra = {
        "slide_path": os.path.abspath(slide_path),
        "slide_name": slide_name,
        "slide_mpp": list(slide_mpp) if slide_mpp is not None else None,
        "files": [p.name for p in written] + ["result.json"],
    }
    written.append(write_result_json(out / "result.json", result, steps, extra))
    return written
