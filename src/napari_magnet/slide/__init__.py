"""Whole-slide image access: open, geometry, lazy pyramid, the plugin's sample slides.

Imports neither torch nor napari.
"""

from .errors import SlideError
from .geometry import SlideGeometry, paper_level
from .slide import SLIDE_SUFFIXES, Slide, is_slide, open_slide

__all__ = [
    "SLIDE_SUFFIXES",
    "Slide",
    "SlideError",
    "SlideGeometry",
    "is_slide",
    "open_slide",
    "paper_level",
]
