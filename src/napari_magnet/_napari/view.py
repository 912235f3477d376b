"""``napari-magnet view SLIDE...``: a viewer with slides opened by our reader and the Magnify
widget docked, whatever reader napari's settings prefer."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .open_routes import PLUGIN, check_slides
from .widget import add_magnify_widget

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

__all__ = ["open_slides_in", "view_slides"]


def open_slides_in(viewer: napari.Viewer, paths: Iterable[str | Path], **widget_kwargs: Any):
    """Open ``paths`` with our reader and dock the Magnify widget (``napari-magnet view``).

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer.
    paths : iterable of path-like
        Slides (files, or DICOM folders).
    **widget_kwargs
        Passed to :class:`~.widget.MagnifyWidget`.

    Returns
    -------
    MagnifyWidget
        The docked widget (it fits the view to the slides once docked).
    """
    for path in paths:
        viewer.open(str(path), plugin=PLUGIN)
    return add_magnify_widget(viewer, **widget_kwargs)


def view_slides(paths: Sequence[str | Path], *, show: bool = True) -> tuple:
    """A new viewer with ``paths`` open through our reader and the Magnify widget docked.

    Returns
    -------
    tuple
        ``(viewer, widget)``; run napari's event loop (``napari.run()``) to hand it to the user.
    """
    import napari

    checked = check_slides(paths)
    viewer = napari.Viewer(title="napari-magnet", show=show)
    return viewer, open_slides_in(viewer, checked)
