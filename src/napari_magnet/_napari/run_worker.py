"""The worker side of a Magnify run: the records it yields, the model cache, model listing.

Nothing here touches the viewer or Qt: :func:`magnify_items` runs in a worker thread and
yields frozen records (:class:`ModelLoaded`, :class:`TissueReady`, :class:`StepReady`,
:class:`RunCompleted`) that :class:`~.run_controller.RunController` turns into layers in the
GUI thread. What a model does is asked of its family (:mod:`napari_magnet.models.family`):
this module never names one. torch is imported lazily (through the model registry).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io.layerdata import (
    coverage_grid_shape,
    coverage_summary,
    resize_mask,
    step_layer_data,
    tissue_mask,
)

#: Cells along the longer side of the coverage grid.
COVERAGE_GRID = 512

# models loaded once per (spec, device) and reused by later runs (never holds viewer objects)
_MODEL_CACHE: dict[tuple[str, str], Any] = {}
_MODEL_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRequest:
    """What one run is asked to do (built in the GUI thread, read in the worker).

    Attributes
    ----------
    slide : Slide
        The open slide (``slide_layer.metadata["slide"]``).
    slide_path : str
        Its file.
    mpp : (float, float) or None
        Level-0 µm per pixel.
    model : str
        A model name or checkpoint path.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    box : tuple or None
        Level-0 ``(x0, y0, x1, y1)`` the first layer is restricted to.
    n_patches : int or None
        Patches override (only for families with adjustable patches).
    """

    slide: Any
    slide_path: str
    mpp: tuple[float, float] | None
    model: str
    device: str
    box: tuple | None = None
    n_patches: int | None = None


@dataclass(frozen=True)
class ModelLoaded:
    """The model is loaded: its display name and how many steps a run yields."""

    name: str
    expected_steps: int


@dataclass(frozen=True)
class TissueReady:
    """The slide's tissue mask on the coverage grid."""

    mask: np.ndarray


@dataclass(frozen=True)
class StepReady:
    """One ``MagnifyStep`` and its layer data (``io.layerdata.StepLayerData``)."""

    step: Any
    data: Any


@dataclass(frozen=True)
class RunCompleted:
    """The run's ``MagnifyResult``."""

    result: Any


class MagnifyFailed(Exception):
    """A run failed in the worker; ``error`` is the original exception.

    The worker raises this instead of the original so that every failure reaches the
    worker's ``errored`` signal: superqt's generator worker swallows a ``RuntimeError``
    escaping the generator (it takes it for a deleted Qt object) and then emits neither
    ``errored`` nor ``finished`` — and CUDA out-of-memory is a ``RuntimeError``.
    """

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


# --------------------------------------------------------------------------------------------
# environment and models (torch imported lazily)
# --------------------------------------------------------------------------------------------


def avoid_triton_llvm_clash() -> bool:
    """Keep torch from importing ``triton`` once Mesa's LLVM is loaded in this process.

    napari rendering through Mesa (llvmpipe: Xvfb, VMs, remote desktops) loads ``libLLVM``;
    ``triton`` (pulled in by ``torch._dynamo`` when torchvision is first imported) bundles its
    own LLVM, and loading it next to Mesa's crashes the process (segfault). The plugin never
    compiles with triton, so when ``libLLVM`` is mapped and triton is not yet imported,
    ``sys.modules["triton"] = None`` makes torch see "no triton".

    Returns
    -------
    bool
        Whether it did so.
    """
    if "triton" in sys.modules:
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            mapped = fh.read()
    except OSError:  # not Linux: no Mesa/LLVM clash known
        return False
    if "libLLVM" not in mapped:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


def demo_available() -> bool:
    """Whether ``load_model("demo")`` can work: the shipped checkpoint is present."""
    from ..models.registry import DEMO_CHECKPOINT

    return DEMO_CHECKPOINT.is_file()


def model_choices() -> list[str]:
    """Model names for the model box, in the registry's listing order (``demo`` first when
    shipped, then each family's named configurations)."""
    from ..models.registry import listed_models

    return list(listed_models())


def patches_adjustable(spec: str) -> bool:
    """Whether the Patches box applies to ``spec`` (a name, ``"demo"`` or a checkpoint path):
    its family's ``adjustable_patches``; ``False`` when the family is unknown."""
    from ..models.registry import family_of_spec

    try:
        family = family_of_spec(spec)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint: no override
        return False
    return bool(family is not None and family.adjustable_patches)


def cuda_status() -> tuple[bool, str]:
    """Whether CUDA can be used, and the reason when not.

    Returns
    -------
    (bool, str)
        ``(available, reason)``; the reason is empty when available.
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        return False, f"PyTorch is not importable: {exc}"
    if torch.cuda.is_available():
        return True, ""
    if torch.version.cuda is None:
        return False, "This PyTorch build has no CUDA support (CPU-only build)."
    return False, "PyTorch sees no CUDA device (no GPU, or the driver is missing)."


def _is_path(spec: str) -> bool:
    return Path(spec).suffix in (".safetensors", ".json") or "/" in spec or Path(spec).exists()


def load_model_cached(spec: str, device: str) -> Any:
    """``load_model(spec, device)``, cached per (spec, device) for named models.

    Checkpoint paths are loaded each time (the file may have changed).
    """
    from ..models.registry import load_model

    key = (spec, device)
    cached = not _is_path(spec)
    with _MODEL_LOCK:
        if cached and key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        model = load_model(spec, device=device)
        if cached:
            _MODEL_CACHE[key] = model
        return model


def clear_model_cache() -> None:
    """Forget the cached models."""
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a failed run (unwraps :class:`MagnifyFailed`)."""
    if isinstance(exc, MagnifyFailed):
        exc = exc.error
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    hint = ""
    if "OutOfMemory" in name or "out of memory" in text.lower():
        hint = " — try the CPU device, or close other GPU programs"
    return f"{name}: {text}{hint}"


# --------------------------------------------------------------------------------------------
# the worker's generator
# --------------------------------------------------------------------------------------------


def magnify_items(request: RunRequest) -> Iterator[Any]:
    """The records of one run, computed off the GUI thread.

    Yields :class:`ModelLoaded`, :class:`TissueReady`, then one :class:`StepReady` per step
    (ROI rectangles, composite attention and coverage already computed) and
    :class:`RunCompleted`. Exceptions propagate; closing the generator closes the
    ``magnify`` stream (its region-reading pool) in the thread that closes it.

    Parameters
    ----------
    request : RunRequest
        The run.
    """
    from ..engine.magnify import magnify
    from ..engine.types import MagnifyResult
    from ..models.family import family_of

    model = load_model_cached(request.model, request.device)
    yield ModelLoaded(
        str(getattr(model, "model_name", request.model)),
        int(family_of(model).expected_steps(model)),
    )
    slide = request.slide
    dims = slide.dimensions
    grid = coverage_grid_shape(dims, COVERAGE_GRID)
    tissue = resize_mask(tissue_mask(slide.thumbnail(1024)), grid)
    yield TissueReady(tissue)
    stream = magnify(slide, model, request.device, box=request.box, n_patches=request.n_patches)
    steps: list = []
    try:
        for item in stream:
            if isinstance(item, MagnifyResult):
                yield RunCompleted(item)
            else:
                steps.append(item)
                yield StepReady(item, step_layer_data(item, request.mpp, dims, steps, tissue))
    finally:
        stream.close()


def guarded_items(
    items: Callable[[RunRequest], Iterator[Any]],
    request: RunRequest,
    cancel: threading.Event,
    done: threading.Event | None = None,
) -> Iterator[Any]:
    """The worker's generator: ``items(request)`` stopped at the first step boundary after
    ``cancel`` is set.

    The source is closed in the worker thread (``magnify`` closes its region-reading pool
    there) and any exception is re-raised as :class:`MagnifyFailed`, so that it reaches the
    worker's ``errored`` signal.

    Parameters
    ----------
    items : callable
        ``items(request) -> iterator of records`` (:func:`magnify_items`).
    request : RunRequest
        The run.
    cancel : threading.Event
        Set by the GUI thread to stop the run.
    done : threading.Event, optional
        Set once the source is closed: the run does no more work (the GUI thread can wait for
        it without waiting for the worker's queued signals).

    Yields
    ------
    object
        The records of ``items(request)``.
    """
    try:
        source = items(request)
        try:
            for record in source:
                if cancel.is_set():
                    return
                yield record
                if cancel.is_set():
                    return
        finally:
            source.close()
    except Exception as exc:  # delivered through ``errored``
        raise MagnifyFailed(exc) from exc
    finally:
        if done is not None:
            done.set()


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f}"


def summarize_result(result: Any, coverage: np.ndarray | None = None) -> str:
    """The result line: model, probability, pixels, time and examined tissue.

    Parameters
    ----------
    result : MagnifyResult
        The run's result.
    coverage : numpy.ndarray, optional
        The coverage grid (adds the examined fraction of the tissue).

    Returns
    -------
    str
        ``"<model>: p = … (label …) · … px processed / … px read · … s"``, then
        ``" · tissue examined …%"`` when the coverage knows the tissue.
    """
    parts = [
        f"p = {result.probability:.3f} (label {result.label})",
        (
            f"{_fmt_count(result.pixels_processed)} px processed / "
            f"{_fmt_count(result.pixels_read)} px read"
        ),
        f"{result.seconds:.1f} s",
    ]
    if coverage is not None:
        summary = coverage_summary(coverage)
        if summary.get("tissue_cells"):
            parts.append(f"tissue examined {100 * summary['examined']:.0f}%")
    return f"{result.model_name}: " + " · ".join(parts)
