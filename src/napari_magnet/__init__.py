"""napari-magnet: magnifying networks and attention sampling for whole-slide images.

The public API is three names (DESIGN §6)::

    from napari_magnet import open_slide, load_model, magnify

They are imported lazily so that napari, which imports this package at start-up, does not pay
for torch.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["open_slide", "load_model", "magnify", "__version__"]


def __getattr__(name: str):
    if name == "open_slide":
        from .slide import open_slide

        return open_slide
    if name == "load_model":
        from .models.registry import load_model

        return load_model
    if name == "magnify":
        from .engine.magnify import magnify

        return magnify
    raise AttributeError(f"module 'napari_magnet' has no attribute {name!r}")
