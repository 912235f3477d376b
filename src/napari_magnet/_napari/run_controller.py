"""Magnify runs in a viewer: the state machine, the worker and the layers a run adds.

No Qt widgets here: :class:`RunController` starts a worker thread around
:func:`~.run_worker.magnify_items`, turns the records it yields into layers (through a
:class:`~.layer_queue.LayerQueue`, one layer per event-loop turn) and reports through psygnal
signals; the dock widget's panels (:mod:`._qt`) only display :class:`RunStatus` records.

States (:class:`RunState`); a run always ends in IDLE, as ``"committed"``, ``"cancelled"``
or ``"failed"`` (the ``run_finished`` signal)::

    IDLE        start                                  -> LOADING
    LOADING     model loaded                           -> RUNNING
    LOADING,    Cancel                                 -> CANCELLING
     RUNNING    error (in the worker or adding layers) -> FAILING
    RUNNING     worker done, layers still queued       -> FINISHING
                worker done, every step shown          -> IDLE (committed; cancelled if no result)
    FINISHING   last step shown                        -> IDLE (committed)
                Cancel / error                         -> IDLE (cancelled / failed)
    CANCELLING  worker done                            -> IDLE (cancelled)
    FAILING     worker done                            -> IDLE (failed)

The worker is superqt's generator worker (napari's ``thread_worker`` wraps the same one but
also reports every error itself, which would report a failed run twice).

* **Cancel** sets the run's cancel flag and at once hides every layer of the run (they are
  removed in the next turn of the event loop, in one batch); the worker stops at the next step
  boundary: the generator checks the flag each time it is resumed and closes the ``magnify``
  stream itself, in the worker thread. Steps that arrive after Cancel are dropped; nothing of
  the run stays. Cancelling a run whose worker is already done discards it at once.
* **Errors** (bad checkpoint, CUDA out of memory, unreadable region — any exception in the
  worker) arrive through the worker's ``errored`` signal; a step whose layers cannot be added
  fails the run the same way. The run's layers are removed, ``show_error`` reports it and
  earlier results stay.
* **A new run on a slide replaces the previous run's layers when it completes**: until then
  both are shown (napari suffixes the new names with " [1]"); on completion the old ROI,
  attention and coverage layers are removed, the coverage overlay is added (hidden) and the
  new layers take the plain names. A cancelled or failed run leaves earlier results untouched.
* Layers are added without changing the user's layer selection, and the slide's Annotations
  layer is kept on top.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from psygnal import Signal

from ..io.layerdata import coverage_summary
from .layer_queue import DRAIN_DELAY_MS, LayerQueue, keep_selection
from .layers import (
    KEY,
    add_attention_layer,
    add_roi_layer,
    base_name,
    layer_info,
    layer_kind,
    layers_of,
    set_coverage_layer,
)
from .run_worker import (
    MagnifyFailed,
    ModelLoaded,
    RunCompleted,
    RunRequest,
    StepReady,
    TissueReady,
    describe_error,
    magnify_items,
)

#: Kinds of layers a run adds (replaced by the next committed run on the slide).
RUN_KINDS = ("rois", "attention", "coverage")
_run_ids = itertools.count(1)


class RunState(enum.Enum):
    """Where the controller's run stands."""

    IDLE = "idle"
    """No run (earlier runs' layers may still be being removed)."""
    LOADING = "loading"
    """The worker is loading the model."""
    RUNNING = "running"
    """Steps are streaming in and their layers being added."""
    CANCELLING = "cancelling"
    """Cancel was pressed: the run's layers are gone, the worker is stopping."""
    FAILING = "failing"
    """The run failed: its layers are gone, the worker is stopping."""
    FINISHING = "finishing"
    """The worker is done; the last steps' layers are being added before the commit."""


#: States in which Cancel applies.
CANCELLABLE = frozenset({RunState.LOADING, RunState.RUNNING, RunState.FINISHING})


@dataclass(frozen=True)
class RunStatus:
    """What the Magnify panel shows.

    Attributes
    ----------
    state : RunState
        The run's state.
    shown : int
        Steps whose layers are all in the viewer.
    expected : int
        Steps the run will yield (0 until the model is loaded).
    message : str
        The status line ("Magnifying with …", the result, "Failed: …", "Cancelled: …").
    """

    state: RunState = RunState.IDLE
    shown: int = 0
    expected: int = 0
    message: str = ""

    @property
    def busy(self) -> bool:
        """Whether a run is under way (Magnify and the run settings are disabled)."""
        return self.state is not RunState.IDLE

    @property
    def can_cancel(self) -> bool:
        """Whether Cancel applies."""
        return self.state in CANCELLABLE


@dataclass(eq=False)
class MagnifyRun:
    """One run and what it added (mutated in the GUI thread only).

    Attributes
    ----------
    id : int
        Run number (layers record ``"run <id>"``).
    request : RunRequest
        What the run was asked.
    slide_layer : napari.layers.Image
        The slide layer it runs on.
    cancel_event : threading.Event
        Set to stop the worker at the next step boundary.
    layers : list
        Layers it added (still in the viewer).
    steps : list of MagnifyStep
        Steps received.
    result : MagnifyResult or None
        The result, once received.
    """

    id: int
    request: RunRequest
    slide_layer: Any
    cancel_event: threading.Event = field(default_factory=threading.Event)
    layers: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    result: Any = None
    model_name: str = ""
    expected_steps: int = 0
    tissue: np.ndarray | None = None
    coverage: np.ndarray | None = None
    coverage_layer: Any = None
    cancelled: bool = False
    failed: bool = False
    finished: bool = False  # the worker has stopped
    closed: bool = False  # committed or discarded
    shown: int = 0  # steps whose layers are all in the viewer
    error: str = ""
    started: float = field(default_factory=time.perf_counter)

    @property
    def tag(self) -> str:
        """The run's tag in its layers' metadata."""
        return f"run {self.id}"

    @property
    def alive(self) -> bool:
        """Neither cancelled nor failed (its queued layer operations still run)."""
        return not (self.cancelled or self.failed)

    @property
    def slide_path(self) -> str:
        """The slide's file."""
        return self.request.slide_path

    @property
    def model(self) -> str:
        """The model name or checkpoint path asked for."""
        return self.request.model

    @property
    def device(self) -> str:
        """The device asked for."""
        return self.request.device

    @property
    def box(self) -> tuple | None:
        """The level-0 box layer 1 was restricted to, or ``None``."""
        return self.request.box


def guarded_items(
    items: Callable[[RunRequest], Iterator[Any]], request: RunRequest, cancel: threading.Event
) -> Iterator[Any]:
    """The worker's generator: ``items(request)``, stopped as soon as it is resumed with
    ``cancel`` set, closed in the worker thread, any exception re-raised as
    :class:`~.run_worker.MagnifyFailed` (so that it reaches the worker's ``errored``)."""
    source = items(request)
    try:
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


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f}"


def summarize_result(result: Any, coverage: np.ndarray | None = None) -> str:
    """The result line: model, probability, pixels, time and examined tissue."""
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


class RunController:
    """Runs Magnify in ``viewer``, one run at a time (see the module docstring).

    Parameters
    ----------
    viewer : napari.Viewer
        Where the layers go.
    items : callable
        ``items(request) -> iterator of records`` run in the worker thread (default
        :func:`~.run_worker.magnify_items`; tests pass a scripted one).
    delay_ms : int
        Pause between two queued layer operations.

    Signals
    -------
    status_changed(RunStatus)
        State, progress or status line changed.
    step_shown(int)
        A step's layers are all in the viewer (the number of steps shown).
    run_finished(str)
        A run ended: ``"committed"``, ``"cancelled"`` or ``"failed"``.
    roi_layer_added(layer)
        A run added an ROI layer.
    committed(MagnifyRun)
        A run's layers replaced the slide's previous results.
    """

    status_changed = Signal(object)
    step_shown = Signal(int)
    run_finished = Signal(str)
    roi_layer_added = Signal(object)
    committed = Signal(object)

    def __init__(
        self,
        viewer: Any,
        *,
        items: Callable[[RunRequest], Iterator[Any]] = magnify_items,
        delay_ms: int = DRAIN_DELAY_MS,
    ) -> None:
        self.viewer = viewer
        self.items = items
        self.queue = LayerQueue(on_error=self._fail, delay_ms=delay_ms)
        self.last_runs: dict[str, MagnifyRun] = {}
        self._state = RunState.IDLE
        self._run: MagnifyRun | None = None
        self._worker: Any = None
        self._shown = 0
        self._expected = 0
        self._message = ""

    # -- state -----------------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        """The current :class:`RunState`."""
        return self._state

    @property
    def status(self) -> RunStatus:
        """The current :class:`RunStatus`."""
        return RunStatus(self._state, self._shown, self._expected, self._message)

    @property
    def current_run(self) -> MagnifyRun | None:
        """The run under way, or ``None``."""
        return self._run

    @property
    def worker(self) -> Any:
        """The running worker, or ``None``."""
        return self._worker

    @property
    def is_running(self) -> bool:
        """Whether anything is under way: a run (also while cancelling or finishing), or layer
        operations still queued (removing a cancelled or replaced run's layers)."""
        return self._state is not RunState.IDLE or self.queue.busy

    def _set_state(self, state: RunState | None = None) -> None:
        if state is not None:
            self._state = state
        self.status_changed.emit(self.status)

    # -- commands --------------------------------------------------------------------------
    def start(self, slide_layer: Any, request: RunRequest) -> Any:
        """Start a run; returns its worker, or ``None`` when a run is under way."""
        from superqt.utils import create_worker

        if self._state is not RunState.IDLE:
            return None
        run = MagnifyRun(id=next(_run_ids), request=request, slide_layer=slide_layer)
        self._run = run
        self._shown, self._expected = 0, 0
        self._message = f"Magnifying with {request.model}…"
        # superqt's worker, not napari's: napari's also reports every error itself
        worker = create_worker(
            guarded_items,
            self.items,
            request,
            run.cancel_event,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(lambda record, r=run: self._on_yielded(r, record))
        worker.errored.connect(lambda exc, r=run: self._on_errored(r, exc))
        worker.finished.connect(lambda r=run: self._on_finished(r))
        self._worker = worker
        self._set_state(RunState.LOADING)
        worker.start()
        return worker

    def cancel(self) -> bool:
        """Cancel the run (see the module docstring); returns whether Cancel applied."""
        run = self._run
        if run is None or not run.alive or self._state not in CANCELLABLE:
            return False
        run.cancelled = True
        run.cancel_event.set()
        self._remove_run_layers(run)
        self._message = "Cancelled: stopping at the next step…"
        if run.finished:
            self._close(run)
        else:
            self._set_state(RunState.CANCELLING)
        return True

    def slide_removed(self, slide_layer: Any) -> None:
        """Cancel the run if it runs on ``slide_layer``."""
        if self._run is not None and self._run.slide_layer is slide_layer:
            self.cancel()

    def shutdown(self) -> None:
        """Ask the worker to stop (the application is quitting)."""
        if self._run is not None:
            self._run.cancel_event.set()

    def remove_layers_later(self, layers: list) -> None:
        """Hide ``layers`` now; remove them in the next turn of the event loop, all in one
        batch (napari runs a full garbage collection after removing layers — ~0.5 s with torch
        loaded — once per batch instead of once per layer)."""
        doomed = [layer for layer in layers if layer in self.viewer.layers]
        if not doomed:
            return
        for layer in doomed:
            layer.visible = False
        self.queue.push(lambda: self._remove_now(doomed))

    # -- worker signals --------------------------------------------------------------------
    def _on_yielded(self, run: MagnifyRun, record: Any) -> None:
        if run is not self._run or not run.alive or run.closed:
            return
        try:
            if isinstance(record, ModelLoaded):
                run.model_name = record.name
                run.expected_steps = self._expected = int(record.expected_steps)
                self._set_state(RunState.RUNNING)
            elif isinstance(record, TissueReady):
                run.tissue = record.mask
            elif isinstance(record, StepReady):
                self._add_step(run, record)
            elif isinstance(record, RunCompleted):
                run.result = record.result
                self._message = summarize_result(run.result, run.coverage)
                self._set_state()
        except Exception as exc:  # noqa: BLE001 - a broken step must not take napari down
            self._fail(run, exc)

    def _on_errored(self, run: MagnifyRun, exc: BaseException) -> None:
        if run is self._run:
            self._fail(run, exc)

    def _on_finished(self, run: MagnifyRun) -> None:
        """The worker is done; commit once the queued layers of its last step are shown."""
        if run is self._run:
            self._worker = None
        run.finished = True
        if run.closed:
            return
        if not run.alive or run.result is None or run.shown >= len(run.steps):
            self._close(run)
        else:
            self._set_state(RunState.FINISHING)

    # -- layers ----------------------------------------------------------------------------
    def _push(self, run: MagnifyRun, action: Callable[[], Any]) -> None:
        """Queue ``action`` for ``run``: the layer it returns is recorded as the run's."""

        def checked() -> None:
            if run.slide_layer not in self.viewer.layers:
                raise RuntimeError(f"the slide layer {run.slide_layer.name!r} was removed")
            with keep_selection(self.viewer):
                added = action()
            if added is not None and added not in run.layers:
                run.layers.append(added)

        self.queue.push(checked, owner=run)

    def _add_step(self, run: MagnifyRun, record: StepReady) -> None:
        """Queue the step's attention overlay, its ROI rectangles, then the bookkeeping."""
        step, data = record.step, record.data
        run.steps.append(step)
        run.coverage = data.coverage
        self._push(
            run,
            lambda: add_attention_layer(
                self.viewer, run.slide_layer, data.attention, step.layer, run.tag, data.n_maps
            ),
        )
        self._push(run, lambda: self._add_rois(run, step.layer, data.rois))
        self._push(run, lambda: self._step_shown(run))

    def _add_rois(self, run: MagnifyRun, layer_no: int, rois: Any) -> Any:
        layer = add_roi_layer(
            self.viewer, run.slide_layer, rois.rects, rois.features, layer_no, run.tag
        )
        self.roi_layer_added.emit(layer)
        return layer

    def _step_shown(self, run: MagnifyRun) -> None:
        """After a step's layers: the user's drawing layers back on top, progress."""
        layers = self.viewer.layers
        for layer in layers_of(self.viewer, run.slide_path, kinds=("annotations",)):
            i = layers.index(layer)
            if i != len(layers) - 1:
                layers.move(i, len(layers))
        run.shown += 1
        self._shown = run.shown
        self._set_state()
        self.step_shown.emit(run.shown)
        if run.finished and run.alive and not run.closed and run.shown >= len(run.steps):
            self._close(run)

    def _remove_run_layers(self, run: MagnifyRun) -> None:
        self.remove_layers_later(run.layers)
        run.layers = []
        run.coverage_layer = None

    def _remove_now(self, layers: list) -> None:
        viewer_layers = self.viewer.layers
        batch = getattr(viewer_layers, "batched_update", None)  # napari >= 0.5.5
        with batch() if batch is not None else contextlib.nullcontext():
            for layer in layers:
                if layer in viewer_layers:
                    viewer_layers.remove(layer)

    # -- ending a run ----------------------------------------------------------------------
    def _fail(self, run: MagnifyRun, exc: BaseException) -> None:
        """Fail ``run``: report, remove its layers; idle once its worker is done."""
        if not run.alive or run.closed:
            return
        self._report_failure(run, exc)
        if run.finished:
            self._close(run)
        else:
            self._set_state(RunState.FAILING)

    def _report_failure(self, run: MagnifyRun, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        run.failed = True
        run.error = describe_error(exc)
        run.cancel_event.set()
        self._remove_run_layers(run)
        self._message = f"Failed: {run.error}"
        show_error(
            f"napari-magnet: Magnify on {run.slide_layer.name} with {run.model} failed: {run.error}"
        )

    def _close(self, run: MagnifyRun) -> None:
        """Commit or discard ``run`` (its worker is done) and go back to idle."""
        if run.closed:
            return
        run.closed = True
        outcome = "failed"
        if run.failed:
            pass
        elif run.cancelled or run.result is None:
            outcome = "cancelled"
            run.cancelled = True  # its still-queued layer operations are dropped
            self._remove_run_layers(run)
            self._message = "Cancelled: no layers kept"
            self._shown = 0
        else:
            try:
                self._commit(run)
                outcome = "committed"
            except Exception as exc:  # noqa: BLE001 - reported, the viewer survives
                if self.last_runs.get(run.slide_path) is run:
                    del self.last_runs[run.slide_path]
                self._report_failure(run, exc)
        if run is self._run:
            self._run = None
        self._set_state(RunState.IDLE)
        self.run_finished.emit(outcome)

    def _commit(self, run: MagnifyRun) -> None:
        old = [
            layer
            for layer in layers_of(self.viewer, run.slide_path, kinds=RUN_KINDS)
            if layer_info(layer).get("run") != run.tag
        ]
        self.remove_layers_later(old)
        if run.coverage is not None:
            self.queue.push(lambda: self._add_coverage(run))
        for layer in run.layers:
            if layer_kind(layer) == "rois":
                layer.metadata[KEY]["committed"] = True
        # plain names once the previous run's layers are gone
        self.queue.push(lambda: self._rename(run))
        self.last_runs[run.slide_path] = run
        self.committed.emit(run)

    def _add_coverage(self, run: MagnifyRun) -> None:
        if (
            run.slide_layer not in self.viewer.layers
            or self.last_runs.get(run.slide_path) is not run
        ):
            return  # the slide is gone, or a newer run replaced this one meanwhile
        with keep_selection(self.viewer):
            run.coverage_layer = set_coverage_layer(
                self.viewer,
                run.slide_layer,
                run.coverage,
                max(run.expected_steps, len(run.steps)),
                run.tag,
            )
        run.layers.append(run.coverage_layer)

    def _rename(self, run: MagnifyRun) -> None:
        for layer in run.layers:
            if layer in self.viewer.layers:
                layer.name = base_name(layer.name)
