"""The ground-truth sidecar of a synthetic slide: ``<name>.truth.json`` next to the TIFF."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..io.atomic import atomic_write_json
from .spec import SIZE_RANGES_MM, Lesion, SyntheticSlideInfo, SyntheticSlideSpec, sidecar_path

__all__ = ["TRUTH_FORMAT", "TRUTH_VERSION", "truth_json", "write_ground_truth", "read_ground_truth"]

#: ``format`` field of every sidecar; :func:`read_ground_truth` refuses other files.
TRUTH_FORMAT = "napari-magnet-synthetic-slide"
TRUTH_VERSION = 1


def truth_json(info: SyntheticSlideInfo, spec: SyntheticSlideSpec) -> dict:
    """The sidecar's content: geometry, label, class, lesions and how the slide was encoded.

    Parameters
    ----------
    info : SyntheticSlideInfo
        The generated slide.
    spec : SyntheticSlideSpec
        The spec it was generated from (for its tile side and JPEG quality).

    Returns
    -------
    dict
        JSON-ready (an infinite upper size bound is ``None``).
    """
    return {
        "format": TRUTH_FORMAT,
        "version": TRUTH_VERSION,
        "slide": info.path.name,
        "width": info.width,
        "height": info.height,
        "mpp": info.mpp,
        "seed": info.seed,
        "label": info.label,
        "lesion_kind": info.lesion_kind,
        "lesions": [{"kind": les.kind, "box": list(les.box)} for les in info.lesions],
        "levels": [list(lv) for lv in info.levels],
        "tile": spec.tile,
        "quality": spec.quality,
        "size_ranges_mm": {
            k: [lo, hi if math.isfinite(hi) else None] for k, (lo, hi) in SIZE_RANGES_MM.items()
        },
    }


def write_ground_truth(info: SyntheticSlideInfo, spec: SyntheticSlideSpec) -> Path:
    """Write the sidecar of ``info`` atomically (see :func:`truth_json`).

    Parameters
    ----------
    info : SyntheticSlideInfo
        The generated slide; the sidecar goes to ``info.sidecar``.
    spec : SyntheticSlideSpec
        The spec it was generated from.

    Returns
    -------
    Path
        The sidecar path.
    """
    return atomic_write_json(sidecar_path(info.path), truth_json(info, spec), indent=1)


def read_ground_truth(path: str | os.PathLike[str]) -> SyntheticSlideInfo:
    """Read the ground truth of a synthetic slide from its sidecar JSON.

    Parameters
    ----------
    path : path-like
        The slide (``x.tif``) or its sidecar (``x.truth.json``).

    Returns
    -------
    SyntheticSlideInfo

    Raises
    ------
    FileNotFoundError
        If the sidecar does not exist.
    ValueError
        If the file is not a synthetic-slide sidecar.
    """
    side = sidecar_path(path)
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{side}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != TRUTH_FORMAT:
        raise ValueError(f"{side}: not a napari-magnet synthetic slide sidecar")
    return SyntheticSlideInfo(
        path=side.parent / data["slide"],
        width=int(data["width"]),
        height=int(data["height"]),
        mpp=float(data["mpp"]),
        seed=int(data["seed"]),
        label=int(data["label"]),
        lesion_kind=str(data["lesion_kind"]),
        lesions=tuple(Lesion(les["kind"], tuple(les["box"])) for les in data["lesions"]),
        levels=tuple((int(w), int(h)) for w, h in data["levels"]),
    )
