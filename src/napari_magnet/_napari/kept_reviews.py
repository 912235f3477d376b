"""Reviewed ROIs survive a new run: they are kept aside instead of being overwritten.

A run writes its results into the slide's previous ROI layers (:mod:`.layer_updates`). When
such a layer carries a decision of the user's — a review state other than ``unreviewed``, or
a class — :func:`keep_reviewed` takes it out of the run's way before the run writes anything:
it is renamed "<slide> · L<k> ROIs (reviewed, run <n>)" and marked ``kept: n`` in our
metadata (:func:`~.layer_kinds.is_kept`), so no run writes into it or removes it, while the
autosave still saves it (restored as the same kept layer) and the review keys still work.
The new run adds its own layers. A run cancelled or failed gives the layers back
(:func:`release`), as if it had never started. No layer reviewed: nothing changes, runs keep
updating in place.
"""

from __future__ import annotations

from typing import Any

from .layer_kinds import base_name, is_kept, layer_info, layers_of

__all__ = [
    "KEPT_KEY",
    "announce_kept",
    "has_decisions",
    "keep_reviewed",
    "kept_name",
    "release",
]

#: Key of our metadata (and of ``properties.napari_magnet`` in the autosave) holding ``n``.
KEPT_KEY = "kept"


def has_decisions(layer: Any) -> bool:
    """Whether any shape of ``layer`` has a class or a review state other than unreviewed."""
    feats = layer.features
    classes = feats["class"] if "class" in feats else ()
    reviews = feats["review"] if "review" in feats else ()
    return any(isinstance(c, str) and c for c in classes) or any(
        isinstance(r, str) and r not in ("", "unreviewed") for r in reviews
    )


def kept_name(name: str, n: int) -> str:
    """``"<name> (reviewed, run <n>)"``, the name of a kept ROI layer."""
    return f"{base_name(name)} (reviewed, run {int(n)})"


def keep_reviewed(viewer: Any, slide_path: str) -> list[tuple[Any, str]]:
    """Keep the slide's ROI layers that carry decisions (see the module docstring).

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    slide_path : str
        The slide a run is about to write results for.

    Returns
    -------
    list of (layer, str)
        Each layer kept and its name before, for :func:`release`; empty when none is reviewed.
    """
    rois = layers_of(viewer, slide_path, kinds=("rois",))
    reviewed = [layer for layer in rois if not is_kept(layer) and has_decisions(layer)]
    if not reviewed:
        return []
    n = 1 + max((int(layer_info(layer).get(KEPT_KEY) or 0) for layer in rois), default=0)
    kept = []
    for layer in reviewed:
        previous = layer.name
        layer_info(layer)[KEPT_KEY] = n
        layer.name = kept_name(previous, n)
        kept.append((layer, previous))
    return kept


def release(viewer: Any, kept: list[tuple[Any, str]]) -> None:
    """Undo :func:`keep_reviewed` (the run that kept them did not commit): the layers get
    their names back and are the slide's results again."""
    for layer, previous in kept:
        if layer in viewer.layers:
            layer_info(layer).pop(KEPT_KEY, None)
            layer.name = previous


def announce_kept(kept: list[tuple[Any, str]], slide_name: str) -> None:
    """Tell the user where the reviews of the previous run went (a napari notification)."""
    from napari.utils.notifications import show_info

    names = ", ".join(f"'{layer.name}'" for layer, _ in kept)
    show_info(
        f"napari-magnet: your reviews of the previous run on {slide_name} are kept in "
        f"{names}; the new run's ROIs are in new layers"
    )
