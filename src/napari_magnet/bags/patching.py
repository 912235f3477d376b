"""Patch slides: tissue mask → nested grids → one bag file per slide (``<stem>.h5``).

:func:`patch_slide` is the unit of work — one slide in, one file out, an outcome back (never
an exception for a bad slide) — so a scheduler (a loop here, dask.distributed later) can run
it per slide, skip slides whose output exists and validates, and report failures without
stopping the others. :func:`patch_slides` is the serial loop the CLI uses.

A slide's pixel size comes from its file (``openslide.mpp-x``/``-y``); failing that from
:attr:`PatchOptions.slide_mpp`, then from the objective power (``10 / power``), and a slide
with none of them fails with that reason. Imports neither torch nor napari.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..slide import Slide, SlideError, open_slide
from .bagfile import BagError, validate_bag, write_bag
from .grid import nested_grid, parse_mpps, plan_magnifications
from .records import Bag
from .tissue import TissueOptions, slide_tissue_mask

__all__ = [
    "PatchOptions",
    "SlideOutcome",
    "bag_path_for",
    "make_bag",
    "patch_slide",
    "patch_slides",
    "slide_pixel_size",
    "summary",
]


@dataclass(frozen=True)
class PatchOptions:
    """How slides are patched.

    Parameters
    ----------
    mpps : tuple of float or str
        Target µm per pixel, coarsest first, each the previous one divided by an integer
        (``"8,4,1"`` is parsed).
    patch_size : int
        Patch side in pixels at every magnification.
    tissue : TissueOptions
        The tissue rule's thresholds and the coarse patches' minimum tissue fraction.
    slide_mpp : float, optional
        µm per level-0 pixel for slides whose file records none.
    """

    mpps: tuple[float, ...] = (8.0, 4.0, 1.0)
    patch_size: int = 224
    tissue: TissueOptions = field(default_factory=TissueOptions)
    slide_mpp: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mpps", parse_mpps(self.mpps))
        if int(self.patch_size) < 8:
            raise ValueError(f"patch size must be at least 8 pixels, got {self.patch_size}")
        if self.slide_mpp is not None and not float(self.slide_mpp) > 0:
            raise ValueError(f"slide µm per pixel must be positive, got {self.slide_mpp}")

    def config(self) -> dict:
        """What a bag file records of the options (compared when a run is resumed)."""
        return {
            "mpps": [float(m) for m in self.mpps],
            "patch_size": int(self.patch_size),
            "tissue": self.tissue.config(),
            "slide_mpp": None if self.slide_mpp is None else float(self.slide_mpp),
        }


@dataclass(frozen=True)
class SlideOutcome:
    """What happened to one slide.

    Parameters
    ----------
    slide : Path
        The slide.
    output : Path
        Its bag file.
    status : str
        ``"written"``, ``"skipped"`` (a valid file made with the same options exists) or
        ``"failed"``.
    patches : tuple of int
        Patches per magnification, coarsest first (empty when failed).
    reason : str
        Why it failed (empty otherwise).
    seconds : float
        Time spent on it.
    """

    slide: Path
    output: Path
    status: str
    patches: tuple[int, ...] = ()
    reason: str = ""
    seconds: float = 0.0


def bag_path_for(slide_path: str | Path, out_dir: str | Path) -> Path:
    """``<out_dir>/<slide stem>.h5``."""
    return Path(out_dir) / f"{Path(slide_path).stem}.h5"


def slide_pixel_size(
    slide: Slide, fallback: float | None = None
) -> tuple[tuple[float, float], str]:
    """The slide's µm per level-0 pixel and where it came from.

    Returns
    -------
    ((float, float), str)
        ``(mpp_x, mpp_y)`` and ``"file"``, ``"given"`` or ``"objective_power"``.

    Raises
    ------
    ValueError
        When the file records neither and no fallback is given.
    """
    if slide.mpp is not None:
        return slide.mpp, "file"
    if fallback is not None:
        return (float(fallback), float(fallback)), "given"
    if slide.objective_power:
        mpp = 10.0 / slide.objective_power
        return (mpp, mpp), "objective_power"
    raise ValueError(
        f"{slide.path.name}: the file records no pixel size nor objective power; "
        "give one with --slide-mpp"
    )


def make_bag(slide: Slide, options: PatchOptions) -> tuple[Bag, dict[str, dict]]:
    """The nested grids of an open slide, and each level's ``coords`` attributes.

    Returns
    -------
    (Bag, dict)
        The bag (no features) and level name → ``coords`` attributes, as :func:`write_bag`
        takes them.
    """
    slide_mpp, source = slide_pixel_size(slide, options.slide_mpp)
    plans = plan_magnifications(slide.geometry, slide_mpp, options.mpps, options.patch_size)
    mask = slide_tissue_mask(slide, options.tissue)
    levels = nested_grid(plans, slide.dimensions, mask, options.tissue.min_fraction)
    attrs = {
        "slide_file": slide.requested_path.name,
        "slide_path": str(Path(slide.requested_path).resolve()),
        "mpp_source": source,
        "patch_size": int(options.patch_size),
        "tissue_level": int(mask.level),
        "tissue_fraction": mask.fraction,
        "config": json.dumps(options.config(), sort_keys=True),
    }
    bag = Bag(
        source="napari-magnet",
        slide_name=slide.name,
        levels=levels,
        level0_size=slide.dimensions,
        slide_mpp=slide_mpp,
        attrs=attrs,
    )
    coords_attrs = {
        level.name: plan.coords_attrs(slide.geometry, slide_mpp)
        for level, plan in zip(levels, plans)
    }
    return bag, coords_attrs


def patch_slide(
    slide_path: str | Path,
    output: str | Path,
    options: PatchOptions | None = None,
    overwrite: bool = False,
) -> SlideOutcome:
    """Patch one slide into one bag file; a failure is returned, not raised.

    Parameters
    ----------
    slide_path : path-like
        The slide.
    output : path-like
        The bag file to write (atomically).
    options : PatchOptions, optional
        Default :class:`PatchOptions`.
    overwrite : bool
        Rewrite a valid existing file instead of skipping the slide.
    """
    options = options or PatchOptions()
    slide_path, output = Path(slide_path), Path(output)
    start = time.perf_counter()
    if not overwrite and output.exists() and not validate_bag(output, options.config()):
        return SlideOutcome(slide_path, output, "skipped", seconds=time.perf_counter() - start)
    try:
        with open_slide(slide_path) as slide:
            bag, coords_attrs = make_bag(slide, options)
        write_bag(output, bag, coords_attrs)
    except (SlideError, BagError, ValueError, OSError) as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - one slide's bug must not stop a cohort
        reason = f"{type(error).__name__}: {error}"
    else:
        return SlideOutcome(
            slide_path,
            output,
            "written",
            tuple(len(level) for level in bag.levels),
            seconds=time.perf_counter() - start,
        )
    return SlideOutcome(
        slide_path, output, "failed", reason=reason, seconds=time.perf_counter() - start
    )


def patch_slides(
    slides: Iterable[str | Path],
    out_dir: str | Path,
    options: PatchOptions | None = None,
    overwrite: bool = False,
    progress: Callable[[SlideOutcome], None] | None = None,
) -> list[SlideOutcome]:
    """Patch slides one after the other; every slide gets an outcome.

    Parameters
    ----------
    slides : iterable of path-like
        The slides. Two slides with the same file stem would write the same bag file: the
        second one fails with that reason.
    out_dir : path-like
        Where ``<stem>.h5`` files go (created).
    options : PatchOptions, optional
        Default :class:`PatchOptions`.
    overwrite : bool
        Rewrite valid existing files.
    progress : callable, optional
        Called with each slide's outcome as it is known.
    """
    out_dir = Path(out_dir)
    outcomes: list[SlideOutcome] = []
    seen: dict[Path, Path] = {}
    for slide in slides:
        slide = Path(slide)
        output = bag_path_for(slide, out_dir)
        if output in seen:
            outcome = SlideOutcome(
                slide, output, "failed", reason=f"{seen[output]} also writes {output.name}"
            )
        else:
            seen[output] = slide
            outcome = patch_slide(slide, output, options, overwrite)
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    return outcomes


def summary(outcomes: Sequence[SlideOutcome]) -> str:
    """One line: how many slides were written, skipped and failed."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("written", "skipped", "failed")}
    return ", ".join(f"{n} {s}" for s, n in counts.items())
