"""npe2 readers: any OpenSlide format → one multiscale RGB image layer in µm.

:func:`get_reader` opens slides. :func:`get_other_image_reader` comes after it in the manifest:
when the user made napari-magnet the preferred reader of ``*.tif`` (see
:mod:`.open_routes`), napari asks only our readers, and a TIFF that is not a slide would fail
to open; this reader hands such a file to napari's builtin reader instead.
"""

from __future__ import annotations

from pathlib import Path

from ..slide import Slide, is_slide, open_slide

#: slides already told to have no pixel size this session (resolved paths)
_NO_MPP_NOTIFIED: set[str] = set()


def slide_layer_data(slide: Slide) -> tuple:
    """The ``(data, kwargs, "image")`` layer tuple napari builds the slide layer from."""
    scale = (slide.mpp[1], slide.mpp[0]) if slide.mpp else (1.0, 1.0)
    meta = slide.metadata()
    meta["slide"] = slide  # the live object, for the Magnify widget and the Python console
    kwargs = {
        "name": slide.name,
        "rgb": True,
        "multiscale": slide.level_count > 1,
        "scale": scale,
        "units": ("µm", "µm") if slide.mpp else ("pixel", "pixel"),
        "metadata": meta,
        # Our chunk cache already keeps decoded tiles; napari's dask cache would hold a
        # second copy outside the slide's memory bound.
        "cache": False,
    }
    data = slide.pyramid if slide.level_count > 1 else slide.pyramid[0]
    return (data, kwargs, "image")


def _single(path: str | list[str]) -> str | None:
    if isinstance(path, list | tuple):
        return str(path[0]) if len(path) == 1 else None
    return str(path)


def get_reader(path: str | list[str]):
    """Return a reader for a slide (or a folder of DICOM files), or None to decline.

    Files OpenSlide does not recognise are declined so other readers may try; a slide that
    cannot be opened or decoded raises :class:`~napari_magnet.slide.SlideError`, which napari
    shows to the user.
    """
    path = _single(path)
    if path is None or not is_slide(path):
        return None
    return read_slide


def notify_no_pixel_size(slide: Slide) -> bool:
    """Tell the user, once per slide and session, that ``slide`` opens in pixels.

    Returns
    -------
    bool
        Whether a notification was shown (``False``: the slide has a pixel size, or was
        already reported).
    """
    if slide.mpp:
        return False
    key = str(Path(slide.path).resolve())
    if key in _NO_MPP_NOTIFIED:
        return False
    _NO_MPP_NOTIFIED.add(key)
    from napari.utils.notifications import show_info

    show_info(
        f"napari-magnet: {slide.name} has no pixel size recorded (no mpp) — it opens in "
        "pixels: coordinates, lengths and scale bars are level-0 pixels, not µm."
    )
    return True


def read_slide(path: str | list[str]) -> list[tuple]:
    """Open the slide and return its layer tuple (and say so if it has no pixel size)."""
    if isinstance(path, list | tuple):
        path = path[0]
    layer = slide_layer_data(open_slide(Path(path)))
    notify_no_pixel_size(layer[1]["metadata"]["slide"])
    return [layer]


def get_other_image_reader(path: str | list[str]):
    """Hand a file with a slide pattern that is not a slide to napari's builtin reader.

    Matters when napari-magnet was chosen as the reader (by the user's preference, or in
    napari's reader dialog): napari then tries only our readers, in no fixed order (npe2
    collects them in a set), so this one declines every file another of our readers takes.

    Returns
    -------
    callable or None
        A reader delegating to napari's builtin reader; ``None`` for a slide and for our
        attention-map OME-TIFFs (the other readers' files).
    """
    from .geojson_reader import get_attention_reader

    single = _single(path)
    if single is not None and (is_slide(single) or get_attention_reader(single) is not None):
        return None
    return read_with_builtins


def read_with_builtins(path: str | list[str]) -> list[tuple]:
    """Read ``path`` with napari's builtin reader (npe2's public ``read``)."""
    import npe2

    # npe2 hands a list for a stack, one path otherwise
    stack = isinstance(path, list | tuple)
    paths = [str(p) for p in path] if stack else [str(path)]
    return list(npe2.read(paths, stack=stack, plugin_name="napari"))
