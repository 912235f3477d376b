"""How a slide ends up in our lazy slide layer, whichever way the user opened it.

napari chooses the reader of a file like this (read in napari 0.9.2 and npe2 0.10):

* ``napari slide.svs``, drag-and-drop and **File ▸ Open** call ``viewer.open(..., plugin=None)``:
  the user's preference for the file's pattern
  (``napari.settings.get_settings().plugins.extension2reader``, e.g. ``{"*.svs":
  "napari-magnet"}``) wins; without one, a file only one plugin claims opens with it, and a
  file several plugins claim (napari's builtin reader claims ``*.svs``, ``*.tif``, ``*.ndpi``,
  ``*.scn``, ``*.bif``, ``*.dcm`` …) raises in code and opens napari's reader dialog in the GUI,
  with the builtin reader preselected (the dialog lists readers sorted by display name).
* ``viewer.open(path)`` from code uses ``plugin="napari"`` by default: the builtin reader,
  whatever the preference. ``viewer.open(path, plugin=None)`` honours the preference;
  ``plugin="napari-magnet"`` asks for ours.

A plugin may not change that order, nor the user's settings behind their back. So:

* :func:`set_reader_preference` makes napari-magnet the preferred reader of our slide patterns
  — called only when the user asks (the Magnify widget's *Open slides with napari-magnet*,
  after a confirmation that lists every pattern it sets and every preference it replaces).
  napari-magnet's *other images* reader (:func:`~.reader.get_other_image_reader`) hands a
  ``*.tif`` that is not a slide back to napari's builtin reader, so the preference for the
  shared patterns never makes an ordinary image unopenable.
* :func:`foreign_slide_layers` finds Image layers another reader made from a slide file, and
  :func:`reopen_as_slide` replaces one with our lazy layer (same name, same place in the layer
  list) — the widget offers it with a button and a notification.
* :func:`~.view.open_slides_in` is what ``napari-magnet view SLIDE...`` does: our reader,
  the Magnify widget docked.

Everything here is plain logic over napari's public API; the Qt side is
:mod:`._qt.open_prompt`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..slide import is_slide
from .layers import is_slide_layer

if TYPE_CHECKING:  # pragma: no cover - typing only
    import napari

PLUGIN = "napari-magnet"
#: The slide reader's filename patterns (``napari.yaml`` holds the same list; a test checks).
SLIDE_PATTERNS = (
    "*.svs",
    "*.tif",
    "*.tiff",
    "*.ndpi",
    "*.vms",
    "*.vmu",
    "*.scn",
    "*.mrxs",
    "*.svslide",
    "*.bif",
    "*.dcm",
)
READER_NAMES = {"napari": "napari builtins", "napari-wsi": "napari-wsi"}


def reader_name(plugin: str | None) -> str:
    """A reader plugin's name as the user knows it (``"napari"`` → ``"napari builtins"``)."""
    if not plugin:
        return "another reader"
    return READER_NAMES.get(plugin, plugin)


# --------------------------------------------------------------------------------------------
# the reader preference
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderPreference:
    """Which reader napari's settings prefer for each of our slide patterns.

    Attributes
    ----------
    ours : tuple of str
        Patterns already opened with napari-magnet.
    others : dict
        ``pattern -> plugin`` for patterns the user gave to another reader.
    unset : tuple of str
        Patterns without a preference (napari asks, or uses its builtin reader).
    """

    ours: tuple[str, ...] = ()
    others: dict[str, str] = field(default_factory=dict)
    unset: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Every slide pattern opens with napari-magnet."""
        return not self.others and not self.unset

    @property
    def to_set(self) -> tuple[str, ...]:
        """The patterns :func:`set_reader_preference` would set."""
        return tuple(p for p in SLIDE_PATTERNS if p not in self.ours)


def reader_preference() -> ReaderPreference:
    """The user's reader preference for our slide patterns (read from napari's settings)."""
    from napari.settings import get_settings

    prefs = get_settings().plugins.extension2reader
    ours = tuple(p for p in SLIDE_PATTERNS if prefs.get(p) == PLUGIN)
    others = {p: prefs[p] for p in SLIDE_PATTERNS if prefs.get(p) not in (None, PLUGIN)}
    unset = tuple(p for p in SLIDE_PATTERNS if p not in prefs)
    return ReaderPreference(ours, others, unset)


def describe_preference_change(pref: ReaderPreference | None = None) -> str:
    """What :func:`set_reader_preference` would change, in words (for the confirmation)."""
    pref = pref or reader_preference()
    lines = [
        "napari-magnet becomes napari's preferred reader for "
        + ", ".join(pref.to_set)
        + " (napari's setting Preferences ▸ Plugins ▸ File extension readers)."
    ]
    if pref.others:
        replaced = ", ".join(f"{p} (now {reader_name(r)})" for p, r in pref.others.items())
        lines.append(f"It replaces your choice for {replaced}.")
    lines.append(
        "Files that are not slides (an ordinary .tif, a DICOM series) still open with napari's "
        "builtin reader. Change it back any time in Preferences ▸ Plugins."
    )
    return "\n\n".join(lines)


def set_reader_preference(patterns: Iterable[str] | None = None) -> dict[str, str | None]:
    """Make napari-magnet the preferred reader of ``patterns`` in napari's settings.

    Call it only when the user asked for it: napari saves its settings to disk, so the choice
    lasts across sessions (napari's own reader dialog stores the same setting).

    Parameters
    ----------
    patterns : iterable of str, optional
        Default: every slide pattern (:data:`SLIDE_PATTERNS`).

    Returns
    -------
    dict
        ``pattern -> previous reader`` (``None`` where there was none) of the patterns changed.
    """
    from napari.settings import get_settings

    settings = get_settings().plugins
    current = dict(settings.extension2reader)
    wanted = tuple(SLIDE_PATTERNS if patterns is None else patterns)
    changed = {p: current.get(p) for p in wanted if current.get(p) != PLUGIN}
    if changed:
        # assign a new dict: napari's settings emit their event and save only on assignment
        settings.extension2reader = {**current, **dict.fromkeys(changed, PLUGIN)}
    return changed


def restore_reader_preference(previous: dict[str, str | None]) -> None:
    """Undo :func:`set_reader_preference` (its return value in, the earlier choices back)."""
    from napari.settings import get_settings

    settings = get_settings().plugins
    prefs = dict(settings.extension2reader)
    for pattern, reader in previous.items():
        if reader is None:
            prefs.pop(pattern, None)
        else:
            prefs[pattern] = reader
    settings.extension2reader = prefs


# --------------------------------------------------------------------------------------------
# slides opened by another reader
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _is_slide_file(path: str, mtime_ns: int) -> bool:
    return is_slide(path)


def matches_slide_pattern(path: str | Path) -> bool:
    """The file's name matches one of our slide patterns (case-insensitive)."""
    name = Path(path).name.lower()
    return any(fnmatch(name, pattern) for pattern in SLIDE_PATTERNS)


def foreign_slide_path(layer: Any) -> str | None:
    """The slide file behind an Image layer another reader made, or ``None``.

    ``layer.source.path`` (napari records it for every layer a reader made) must name a file
    with a slide pattern that OpenSlide recognises; our own layers are never foreign.
    """
    from napari.layers import Image

    if not isinstance(layer, Image) or is_slide_layer(layer):
        return None
    source = getattr(layer, "source", None)
    path = getattr(source, "path", None)
    if not path or getattr(source, "reader_plugin", None) == PLUGIN:
        return None
    target = Path(path)
    if not matches_slide_pattern(target):
        return None
    try:
        mtime = target.stat().st_mtime_ns
    except OSError:
        return None
    return str(target) if _is_slide_file(str(target), mtime) else None


def foreign_slide_layers(viewer: napari.Viewer) -> list:
    """Image layers of ``viewer`` holding a slide another reader opened, bottom to top."""
    return [layer for layer in viewer.layers if foreign_slide_path(layer)]


def foreign_reader(layer: Any) -> str:
    """The user-facing name of the reader that made ``layer``."""
    return reader_name(getattr(getattr(layer, "source", None), "reader_plugin", None))


def reopen_as_slide(viewer: napari.Viewer, layer: Any, *, fit: bool = True) -> Any:
    """Replace ``layer`` (a slide another reader opened) by our lazy slide layer.

    The new layer takes the old one's name, place in the layer list, visibility and opacity,
    and becomes the active layer; a slide that fails to open puts the old layer back where it
    was. The world unit changes from pixels to µm (when the slide records a pixel size), so
    the view is refitted.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer holding ``layer``.
    layer : napari.layers.Image
        The layer to replace.
    fit : bool
        Reset the view afterwards.

    Returns
    -------
    napari.layers.Image
        The slide layer.

    Raises
    ------
    ValueError
        ``layer`` is not a slide layer made by another reader.
    """
    path = foreign_slide_path(layer)
    if path is None or layer not in viewer.layers:
        raise ValueError(
            f"{getattr(layer, 'name', layer)!r} is not a slide opened by another reader"
        )
    index = viewer.layers.index(layer)
    name, visible, opacity = layer.name, layer.visible, layer.opacity
    # out first: the new layer is born with the name (napari would make it "name [1]", and the
    # widget names the slide's annotation layer after it), and a pixel layer next to a µm one
    # makes napari warn about inconsistent units
    viewer.layers.remove(layer)
    try:
        (new,) = viewer.open(path, plugin=PLUGIN, name=name)
    except BaseException:
        viewer.layers.insert(index, layer)
        raise
    new.visible = visible
    new.opacity = opacity
    viewer.layers.move(viewer.layers.index(new), index)
    viewer.layers.selection.active = new
    if fit:
        viewer.reset_view()
    return new


# --------------------------------------------------------------------------------------------
# the widget's slide line
# --------------------------------------------------------------------------------------------


def slide_line(layer: Any, foreign: Sequence[Any] = ()) -> str:
    """The widget's one-line description of the chosen slide (or why there is none).

    Parameters
    ----------
    layer : napari.layers.Image or None
        The chosen slide layer.
    foreign : sequence of layers
        Slide layers another reader opened (see :func:`foreign_slide_layers`).
    """
    if layer is None:
        if foreign:
            names = ", ".join(f"‘{f.name}’" for f in foreign)
            return (
                f"No slide layer yet: {names} opened with {foreign_reader(foreign[0])} as a "
                "plain image — reopen it with napari-magnet (button above) to magnify it."
            )
        return (
            "No slide layer: open a slide with napari-magnet (File ▸ Open and choose "
            "napari-magnet, or `napari-magnet view SLIDE`)."
        )
    meta = layer.metadata
    width, height = meta.get("dimensions", (0, 0))
    levels = len(meta.get("level_dimensions", ())) or 1
    parts = [f"{width:,} × {height:,} px", f"{levels} level{'s' if levels > 1 else ''}"]
    if meta.get("vendor"):
        parts.append(str(meta["vendor"]))
    mpp = meta.get("mpp")
    if mpp:
        parts.insert(1, f"{float(mpp[0]):.4g} µm/px")
        return " · ".join(parts)
    return " · ".join(parts) + " — no pixel size recorded: coordinates in pixels"


def viewer_camera(viewer: napari.Viewer) -> Any:
    """The viewer's camera: ``viewer.scene.camera`` (napari ≥ 0.9 deprecates
    ``viewer.camera``), or ``viewer.camera`` on older napari."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None else viewer.camera


def view_is_fitted(viewer: napari.Viewer) -> bool:
    """Whether the camera shows what Home (``viewer.reset_view()``) would show now.

    It asks ``reset_view`` and puts the camera back when the answer differs (napari has no
    public way to compute the fitted camera without applying it).
    """
    camera = viewer_camera(viewer)
    before = {"center": tuple(camera.center), "zoom": camera.zoom, "angles": tuple(camera.angles)}
    viewer.reset_view()
    fitted = bool(
        np.allclose(camera.center, before["center"], rtol=1e-6, atol=1e-6)
        and np.isclose(camera.zoom, before["zoom"], rtol=1e-6)
        and np.allclose(camera.angles, before["angles"], atol=1e-6)
    )
    if not fitted:
        camera.update(before)
    return fitted


# --------------------------------------------------------------------------------------------
# napari-magnet view
# --------------------------------------------------------------------------------------------


def check_slides(paths: Iterable[str | Path]) -> list[str]:
    """The paths as strings, after checking each is a slide OpenSlide opens.

    Raises
    ------
    ValueError
        A path is missing or is not a slide.
    """
    checked = []
    for path in paths:
        target = Path(path)
        if not target.exists():
            raise ValueError(f"{target}: no such file or folder")
        if not is_slide(target):
            raise ValueError(f"{target}: not a slide OpenSlide can open")
        checked.append(str(target))
    return checked
