"""What a synthetic slide is: its spec, its lesions, its ground-truth record.

Also the size classes (Camelyon's) and the size limits every other module of the package
checks against. Imports only numpy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "LESION_KINDS",
    "SLIDE_CLASSES",
    "SIZE_RANGES_MM",
    "TUMOUR_KINDS",
    "DRAW_MM",
    "FIT",
    "Lesion",
    "SyntheticSlideSpec",
    "SyntheticSlideInfo",
    "LEVEL_FACTOR",
    "MAX_LEVEL_SIDE",
    "feasible_kinds",
    "level_sizes",
    "sidecar_path",
]

#: Kinds a :class:`Lesion` can have. The first three are tumour.
LESION_KINDS: tuple[str, ...] = ("macro", "micro", "itc", "distractor")
#: The tumour kinds, largest class first.
TUMOUR_KINDS: tuple[str, ...] = ("macro", "micro", "itc")
#: Slide classes (``SyntheticSlideInfo.lesion_kind``): the largest tumour lesion, or negative.
SLIDE_CLASSES: tuple[str, ...] = ("negative", "itc", "micro", "macro")
#: Camelyon size classes: (lower, upper) bound of a lesion's largest dimension in mm.
SIZE_RANGES_MM: dict[str, tuple[float, float]] = {
    "macro": (2.0, math.inf),
    "micro": (0.2, 2.0),
    "itc": (0.0, 0.2),
}
#: Sizes actually drawn, in mm, safely inside the class ranges. For "macro" the number is the
#: longer side of the lesion's box; for "micro" and "itc" it is the largest diameter (so that
#: the box, which is never larger, stays inside the range too).
DRAW_MM: dict[str, tuple[float, float]] = {
    "macro": (2.2, 6.0),
    "micro": (0.3, 1.7),
    "itc": (0.04, 0.17),
}
#: A lesion's box may use at most this fraction of the slide's shorter side.
FIT = 0.8

#: The pyramid goes down by this factor per level ...
LEVEL_FACTOR = 4
#: ... until the longer side is at most this.
MAX_LEVEL_SIDE = 1024

_MIN_SIDE = 64
_MAX_SIDE = 2**20  # 1,048,576 px: 26 cm at 0.25 µm/px, larger than any glass slide
_MAX_MPP = 100.0


def feasible_kinds(width: int, height: int, mpp: float) -> tuple[str, ...]:
    """Tumour kinds whose smallest drawn size fits a slide of this size.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Microns per level-0 pixel.

    Returns
    -------
    tuple of str
        A subsequence of :data:`TUMOUR_KINDS` (empty when no lesion fits).
    """
    room_mm = FIT * min(width, height) * mpp / 1000.0
    # A macro box needs its longer side >= 2.2 mm; micro/itc need their smallest diameter
    # (whose box is at most that diameter).
    return tuple(k for k in TUMOUR_KINDS if room_mm >= DRAW_MM[k][0])


def level_sizes(width: int, height: int) -> tuple[list[tuple[int, int]], list[int]]:
    """Pyramid levels of a slide: downsample 1, 4, 16, ... down to a longer side <= 1024 px.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels.

    Returns
    -------
    sizes : list of (int, int)
        ``(width, height)`` of each level (rounded up), level 0 first.
    downs : list of int
        Downsample factor of each level.
    """
    sizes = [(width, height)]
    downs = [1]
    while max(sizes[-1]) > MAX_LEVEL_SIDE:
        d = downs[-1] * LEVEL_FACTOR
        sizes.append((-(-width // d), -(-height // d)))
        downs.append(d)
    return sizes, downs


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Ground-truth JSON path of a slide: ``<name>.tif`` -> ``<name>.truth.json``.

    Parameters
    ----------
    path : path-like
        The slide path (or the sidecar path itself, which is returned unchanged).

    Returns
    -------
    Path
    """
    p = Path(path)
    if p.name.endswith(".truth.json"):
        return p
    return p.with_name(p.stem + ".truth.json") if p.suffix else p.with_name(p.name + ".truth.json")


@dataclass(frozen=True)
class Lesion:
    """One lesion (or look-alike distractor) of a synthetic slide.

    Parameters
    ----------
    kind : str
        ``"macro"``, ``"micro"`` or ``"itc"`` (tumour), or ``"distractor"`` (dark,
        tumour-coloured but normal tissue: dense lymphocytes or a tissue fold).
    box : tuple of float
        Bounding box ``(x0, y0, x1, y1)`` in level-0 pixels (x right, y down).
    """

    kind: str
    box: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        if self.kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {self.kind!r}; expected one of {LESION_KINDS}")
        if len(self.box) != 4:
            raise ValueError(f"lesion box must be (x0, y0, x1, y1), got {self.box!r}")
        x0, y0, x1, y1 = (float(v) for v in self.box)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"lesion box must have x1 > x0 and y1 > y0, got {self.box!r}")
        object.__setattr__(self, "box", (x0, y0, x1, y1))

    @property
    def is_tumour(self) -> bool:
        """Whether the lesion is tumour (macro, micro or itc)."""
        return self.kind in TUMOUR_KINDS

    def size_mm(self, mpp: float) -> float:
        """Longer side of the box in millimetres at ``mpp`` µm per level-0 pixel."""
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, y1 - y0) * mpp / 1000.0


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """What to generate.

    Parameters
    ----------
    width, height : int
        Level-0 size in pixels, each in [64, 2**20].
    mpp : float
        Microns per level-0 pixel (0 < mpp <= 100); 0.25 and 0.5 are typical (40x, 20x).
    seed : int
        Non-negative seed; the same spec always gives the same pixels.
    label : int or None
        1 = the slide carries tumour, 0 = negative, None = drawn from the seed (or implied
        by ``lesion_kind``).
    lesion_kind : str or None
        Slide class: ``"macro"``, ``"micro"``, ``"itc"`` or ``"negative"``; None = drawn
        from the seed among the kinds that fit the slide.
    tile : int
        TIFF tile side in pixels (multiple of 16, 64 to 4096).
    quality : int
        JPEG quality, 1 to 100.

    Raises
    ------
    ValueError
        If any value is out of range, the label and kind contradict each other, or the
        slide is too small for the requested lesion kind.
    """

    width: int
    height: int
    mpp: float = 0.5
    seed: int = 0
    label: int | None = None
    lesion_kind: str | None = None
    tile: int = 512
    quality: int = 80

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if not _MIN_SIDE <= int(value) <= _MAX_SIDE:
                raise ValueError(
                    f"{name}={value} px is out of range: a synthetic slide side must be "
                    f"between {_MIN_SIDE} and {_MAX_SIDE} px"
                )
            object.__setattr__(self, name, int(value))
        try:
            mpp = float(self.mpp)
        except (TypeError, ValueError):
            raise ValueError(f"mpp must be a number, got {self.mpp!r}") from None
        if not (math.isfinite(mpp) and 0.0 < mpp <= _MAX_MPP):
            raise ValueError(f"mpp must be > 0 and <= {_MAX_MPP} µm per pixel, got {self.mpp!r}")
        object.__setattr__(self, "mpp", mpp)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not 0 <= int(self.seed) < 2**63:
            raise ValueError(f"seed must be a non-negative integer below 2**63, got {self.seed}")
        object.__setattr__(self, "seed", int(self.seed))
        if self.label is not None:
            if self.label not in (0, 1):
                raise ValueError(f"label must be 0, 1 or None, got {self.label!r}")
            object.__setattr__(self, "label", int(self.label))
        if self.lesion_kind is not None:
            if self.lesion_kind not in SLIDE_CLASSES:
                raise ValueError(
                    f"unknown lesion kind {self.lesion_kind!r}; expected one of "
                    f"{('macro', 'micro', 'itc', 'negative')} or None"
                )
            if self.label == 1 and self.lesion_kind == "negative":
                raise ValueError("label=1 contradicts lesion_kind='negative'")
            if self.label == 0 and self.lesion_kind != "negative":
                raise ValueError(
                    f"label=0 (negative) contradicts lesion_kind={self.lesion_kind!r}; "
                    "use lesion_kind='negative' or None"
                )
            if self.lesion_kind in TUMOUR_KINDS and self.lesion_kind not in feasible_kinds(
                self.width, self.height, mpp
            ):
                lo = DRAW_MM[self.lesion_kind][0]
                raise ValueError(
                    f"a {self.width}x{self.height} px slide at {mpp} µm/px "
                    f"({self.width * mpp / 1000:.2f} x {self.height * mpp / 1000:.2f} mm) is too "
                    f"small for a {self.lesion_kind!r} lesion (needs about {lo / FIT:.2f} mm "
                    "on the shorter side)"
                )
        if self.label == 1 and not feasible_kinds(self.width, self.height, mpp):
            raise ValueError(
                f"a {self.width}x{self.height} px slide at {mpp} µm/px is too small to carry "
                "any lesion; use label=0 or a larger slide"
            )
        if isinstance(self.tile, bool) or not isinstance(self.tile, (int, np.integer)):
            raise ValueError(f"tile must be an integer, got {self.tile!r}")
        if not (64 <= int(self.tile) <= 4096 and int(self.tile) % 16 == 0):
            raise ValueError(f"tile must be a multiple of 16 between 64 and 4096, got {self.tile}")
        object.__setattr__(self, "tile", int(self.tile))
        if isinstance(self.quality, bool) or not isinstance(self.quality, (int, np.integer)):
            raise ValueError(f"quality must be an integer, got {self.quality!r}")
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"JPEG quality must be between 1 and 100, got {self.quality}")
        object.__setattr__(self, "quality", int(self.quality))


@dataclass(frozen=True)
class SyntheticSlideInfo:
    """A generated slide and its ground truth (also stored in the sidecar JSON).

    Parameters
    ----------
    path : Path
        The slide file.
    width, height : int
        Level-0 size in pixels.
    mpp : float
        Microns per level-0 pixel.
    seed : int
        The seed it was generated from.
    label : int
        1 if the slide carries tumour (macro, micro or itc), else 0.
    lesion_kind : str
        Slide class: ``"macro"``, ``"micro"``, ``"itc"`` (the largest tumour lesion) or
        ``"negative"``.
    lesions : tuple of Lesion
        Tumour lesions and distractors, level-0 boxes.
    levels : tuple of (int, int)
        ``(width, height)`` of each pyramid level, level 0 first.
    """

    path: Path
    width: int
    height: int
    mpp: float
    seed: int
    label: int
    lesion_kind: str
    lesions: tuple[Lesion, ...]
    levels: tuple[tuple[int, int], ...]

    @property
    def tumour_lesions(self) -> tuple[Lesion, ...]:
        """The lesions that are tumour (no distractors)."""
        return tuple(les for les in self.lesions if les.is_tumour)

    @property
    def sidecar(self) -> Path:
        """Path of the ground-truth JSON next to the slide."""
        return sidecar_path(self.path)
