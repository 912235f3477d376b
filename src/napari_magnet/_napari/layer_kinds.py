"""Which layers are ours: the metadata key, slide layers and the layers of one slide.

A leaf of the viewer adapter (imports nothing of the project's), so every ``_napari`` module
can identify layers without importing the layer builders.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

__all__ = [
    "KEY",
    "TEXT_COLOR",
    "base_name",
    "is_kept",
    "is_slide_layer",
    "layer_id",
    "layer_info",
    "layer_kind",
    "layers_of",
    "slide_layers",
    "slide_path_of",
]

KEY = "napari_magnet"
TEXT_COLOR = "black"
_SUFFIX_RE = re.compile(r" \[\d+\]$")


def is_slide_layer(layer: Any) -> bool:
    """An Image layer made by our slide reader (its metadata holds the live ``Slide``)."""
    from napari.layers import Image

    return isinstance(layer, Image) and "slide" in getattr(layer, "metadata", {})


def slide_layers(viewer: napari.Viewer) -> list:
    """The viewer's slide layers, bottom to top."""
    return [layer for layer in viewer.layers if is_slide_layer(layer)]


def layer_kind(layer: Any) -> str | None:
    """Our ``metadata["napari_magnet"]["kind"]``, or ``None`` for layers we did not make."""
    info = getattr(layer, "metadata", {}).get(KEY)
    return info.get("kind") if isinstance(info, dict) else None


def layer_info(layer: Any) -> dict:
    """Our metadata dict of a layer (empty for foreign layers)."""
    info = getattr(layer, "metadata", {}).get(KEY)
    return info if isinstance(info, dict) else {}


def is_kept(layer: Any) -> bool:
    """An ROI layer kept for its reviews when a later run came (:mod:`.kept_reviews`): no
    run writes into it or removes it."""
    return bool(layer_info(layer).get("kept"))


def slide_path_of(layer: Any) -> str | None:
    """The slide a layer belongs to (``metadata["path"]`` for a slide layer)."""
    meta = getattr(layer, "metadata", {})
    if "slide" in meta:
        return str(meta.get("path"))
    path = meta.get("slide_path")
    return str(path) if path else None


def layer_id(layer: Any) -> int:
    """A key that is the same for every reference to one layer.

    napari hands a plugin's widget a proxy of the viewer, whose ``layers`` yields a new proxy
    object on every access: ``id()`` and ``is`` then differ for the same layer (equality and
    hashing are forwarded to it). The key is that of the layer behind the proxy (wrapt's
    ``__wrapped__``).
    """
    inner = getattr(layer, "__wrapped__", None)
    while inner is not None and inner is not layer:
        layer, inner = inner, getattr(inner, "__wrapped__", None)
    return id(layer)


def layers_of(
    viewer: napari.Viewer, slide_path: str, kinds: Iterable[str] | None = None, run: Any = None
) -> list:
    """Our layers of ``slide_path`` (optionally of the given kinds / run)."""
    kinds = set(kinds) if kinds is not None else None
    out = []
    for layer in viewer.layers:
        kind = layer_kind(layer)
        if kind is None or slide_path_of(layer) != str(slide_path):
            continue
        if kinds is not None and kind not in kinds:
            continue
        if run is not None and layer_info(layer).get("run") != run:
            continue
        out.append(layer)
    return out


def base_name(name: str) -> str:
    """A layer name without napari's " [1]" de-duplication suffix."""
    return _SUFFIX_RE.sub("", name)
