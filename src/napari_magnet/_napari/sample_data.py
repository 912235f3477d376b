"""Sample-data contributions: the project's synthetic slides (File ▸ Open Sample)."""

from __future__ import annotations

from ..slide import open_slide
from ..slide.samples import sample_path
from .reader import slide_layer_data


def _open_sample(name: str, title: str) -> list[tuple]:
    from napari.utils import progress

    bar = progress(total=0, desc=title)
    try:

        def report(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()

        path = sample_path(name, progress=report)
    finally:
        bar.close()
    return [slide_layer_data(open_slide(path))]


def small_sample() -> list[tuple]:
    """A 12,288 × 9,216 px synthetic slide at 0.5 µm/px with one macro lesion."""
    return _open_sample("small", "Generating the small synthetic slide")


def gigapixel_sample() -> list[tuple]:
    """A 100,000 × 100,000 px synthetic slide at 0.25 µm/px, generated on first use."""
    return _open_sample("gigapixel", "Generating the 100k x 100k synthetic slide (first use)")
