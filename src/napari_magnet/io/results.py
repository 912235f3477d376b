"""One folder per Magnify run: ROIs, annotations, attention maps and a JSON summary (DESIGN §8).

:func:`export_run` writes::

    out_dir/
      rois.geojson                 the run's regions as rectangles (steps_to_annotations)
      annotations.geojson          the user's annotations (an empty FeatureCollection if none)
      attention_L{layer}_{i}.ome.tif   one per attention map (i: 0-based index within the layer)
      result.json                  MagnifyResult fields, config hash, slide, layer summary, files

Every file is written atomically (temporary file + ``os.replace``), so a crash never leaves a
half-written file; ``attention_L*_*.ome.tif`` files left in the folder by an earlier export
that this one did not rewrite are removed, so the folder always describes one run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .geojson import Annotation, _atomic_write_text, steps_to_annotations, write_geojson
from .geojson import _json_safe as _jsonable
from .ome import write_attention_ome_tiff

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ..engine.types import MagnifyResult, MagnifyStep

__all__ = [
    "RESULT_FORMAT",
    "attention_file_name",
    "export_run",
    "layer_summary",
    "write_result_json",
]

#: Value of ``"format"`` in result.json.
RESULT_FORMAT = "napari-magnet-result"
_RESULT_VERSION = 1
_RESERVED = ("format", "version", "created", "result", "config_hash", "layers")
_ATTENTION_RE = re.compile(r"^attention_L\d+_\d+\.ome\.tif$")


def attention_file_name(layer: int, index: int) -> str:
    """``attention_L{layer}_{index}.ome.tif``."""
    return f"attention_L{int(layer)}_{int(index)}.ome.tif"


def layer_summary(step: MagnifyStep) -> dict:
    """JSON-ready summary of one step: layer, counts, aux probability, every region (id,
    parent, box, level, attention mass, scale) and the attention maps' shapes and boxes."""
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
    return _jsonable(
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
    then every key of ``extra`` (which must not reuse those names). Numpy values are converted
    and non-finite floats written as ``null``.
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
    text = json.dumps(_jsonable(doc), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    return _atomic_write_text(path, text)


def export_run(
    out_dir: str | os.PathLike,
    slide_path: str | os.PathLike,
    slide_mpp: tuple[float, float] | None,
    steps: Sequence[MagnifyStep],
    result: MagnifyResult | None,
    annotations: Sequence[Annotation] | None = None,
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

    Returns the written paths in the order: rois.geojson, annotations.geojson, the attention
    maps, result.json.
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
    rois = steps_to_annotations(steps, slide_name=slide_name, probability=probability)
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
