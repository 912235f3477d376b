"""npe2 reader: any OpenSlide format → one multiscale RGB image layer in µm."""

from __future__ import annotations

from pathlib import Path

from ..slide import Slide, is_slide, open_slide


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


def get_reader(path: str | list[str]):
    """Return a reader for a slide (or a folder of DICOM files), or None to decline.

    Files OpenSlide does not recognise are declined so other readers may try; a slide that
    cannot be opened or decoded raises :class:`~napari_magnet.slide.SlideError`, which napari
    shows to the user.
    """
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not is_slide(path):
        return None
    return read_slide


def read_slide(path: str | list[str]) -> list[tuple]:
    """Open the slide and return its layer tuple."""
    if isinstance(path, list):
        path = path[0]
    return [slide_layer_data(open_slide(Path(path)))]
