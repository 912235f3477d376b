"""Level geometry and the rules that pick a pyramid level for a region (DESIGN §2, §4).

Everything here works from the file's own ``level_dimensions`` and float
``level_downsamples``; no integer factor is ever assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LEVEL_RULES = ("enough", "paper")


@dataclass(frozen=True)
class SlideGeometry:
    """Dimensions ``(width, height)`` and downsample of every level, level 0 first."""

    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def level_scale(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per level pixel along (x, y), from the exact dimensions."""
        w0, h0 = self.level_dimensions[0]
        w, h = self.level_dimensions[level]
        return w0 / w, h0 / h

    def choose_level(
        self, box_width: float, box_height: float, size: int, rule: str = "enough"
    ) -> int:
        """Pyramid level to read a region from so it can be rendered at ``size`` pixels.

        Parameters
        ----------
        box_width, box_height : float
            The region in level-0 pixels.
        size : int
            Side of the image the region is rendered into (longer side).
        rule : {"enough", "paper"}
            ``"enough"``: the coarsest level whose rendering of the region still has at least
            ``size`` pixels along the region's longer side; level 0 if none does.
            ``"paper"``: Dimitriou et al.'s formula (see :func:`paper_level`).
        """
        if rule == "enough":
            longer = max(box_width, box_height)
            chosen = 0
            for level, ds in enumerate(self.level_downsamples):
                if longer / ds >= size - 1e-9:
                    chosen = level
            return chosen
        if rule == "paper":
            return paper_level(self.dimensions, self.level_count, box_width, box_height)
        raise ValueError(f"unknown level rule {rule!r}; choose one of {LEVEL_RULES}")


def paper_level(
    dimensions: tuple[int, int], level_count: int, box_width: float, box_height: float
) -> int:
    """The paper's level rule: ``m = max(m_top - R, 0)``.

    ``R_h = floor(log2(h0 / hc))``, ``R_w = floor(log2(w0 / wc))``. The paper's text takes
    ``R = max(R_h, R_w)`` but its printed table (a 50,000 x 100,000 slide with nine levels)
    matches ``R = min(R_h, R_w)`` ("wider than ... or taller than ..." in every row but the
    first), so we follow the table.
    """
    w0, h0 = dimensions
    r_w = math.floor(math.log2(w0 / max(box_width, 1e-9)))
    r_h = math.floor(math.log2(h0 / max(box_height, 1e-9)))
    return min(max(level_count - 1 - min(r_h, r_w), 0), level_count - 1)
