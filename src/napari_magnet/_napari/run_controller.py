"""Magnify runs in a viewer: the state machine, the worker and the layers a run shows.

No Qt widgets here: :class:`RunController` starts a worker thread around
:func:`~.run_worker.magnify_items`, turns the records it yields into layers (through a
:class:`~.layer_queue.LayerQueue`, one layer operation per event-loop turn) and reports through
psygnal signals; the dock widget's panels (:mod:`._qt`) only display :class:`RunStatus` records.

States (:class:`RunState`); a run always ends in IDLE, as ``"committed"``, ``"cancelled"``
or ``"failed"`` (the ``run_finished`` signal)::

    IDLE        start                                  -> LOADING
    LOADING     model loaded                           -> RUNNING
    RUNNING     worker done, layers still queued       -> FINISHING
                worker done, every step shown          -> IDLE (committed; cancelled if no result)
    FINISHING   last step shown                        -> IDLE (committed)
    any of them Cancel                                 -> IDLE (cancelled), at once
                error (in the worker or in a layer)    -> IDLE (failed), at once

The worker is superqt's generator worker (napari's ``thread_worker`` would report errors twice).

* **Cancel and errors never wait for the worker.** The run closes at once: its queued layer
  operations are dropped, the layers it added are hidden (removed next turn, in one batch),
  those it updated get their previous content back. The worker is *detached*: it stops at its
  next step boundary (the generator checks the cancel flag each time it is resumed and closes
  the ``magnify`` stream in the worker thread); what it still yields is dropped. (Waiting for
  its ``finished`` signal once hung a Cancel pressed after the model had finished: the signal
  had already come.)
* **Errors** (any exception in the worker, through its ``errored`` signal, or a step whose
  layers cannot be made) are reported with ``show_error``; earlier results stay.
* **A run updates the slide's previous results in place** (:mod:`.layer_updates`): a step
  writes into the previous layer of its kind and magnifying layer, adding one only where there
  is none; the commit removes the previous layers not reused and updates (or adds, hidden) the
  coverage. ``reuse_layers=False``: a run adds its layers beside the previous ones (names
  suffixed " [1]"), which the commit removes.
* **Reviews are never overwritten** (:mod:`.kept_reviews`): when the run starts, the slide's
  ROI layers that carry a review state or a class are kept aside, renamed "… (reviewed, run
  n)", and neither written into nor removed; the commit says so in a notification. A run
  cancelled or failed gives them back as they were.
* **Shutdown** (:meth:`RunController.shutdown`) silences the controller for good.
* Layers are added without changing the user's layer selection; ROI layers are stacked in
  lineage order above the overlays, the slide's Annotations layer on top.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from psygnal import Signal

from .kept_reviews import announce_kept, keep_reviewed, release
from .layer_kinds import is_kept, layer_id
from .layer_queue import DRAIN_DELAY_MS, LayerQueue
from .layer_updates import (
    discard_later,
    mark_committed,
    reusable_layer,
    show_layer,
    stack_run_layers,
)
from .layers import (
    add_attention_layer,
    add_roi_layer,
    base_name,
    layer_kind,
    layers_of,
    set_coverage_layer,
    set_roi_probability,
)
from .run_worker import (
    ModelLoaded,
    RunCompleted,
    RunRequest,
    StepReady,
    TissueReady,
    describe_error,
    guarded_items,
    magnify_items,
    summarize_result,
)

__all__ = ["MagnifyRun", "RunController", "RunState", "RunStatus", "guarded_items"]

#: Kinds of layers a run shows (replaced by the next committed run on the slide).
RUN_KINDS = ("rois", "attention", "coverage")
_run_ids = itertools.count(1)


class RunState(enum.Enum):
    """Where the controller's run stands."""

    IDLE = "idle"
    """No run (a cancelled run's layers may still be being removed or put back)."""
    LOADING = "loading"
    """The worker is loading the model."""
    RUNNING = "running"
    """Steps are streaming in and their layers being shown."""
    FINISHING = "finishing"
    """The worker is done; the last steps' layers are being shown before the commit."""


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
    """One run and what it shows (mutated in the GUI thread only).

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
        Layers showing the run (added or updated in place; still in the viewer).
    reused : list of [layer, tuple or None]
        Layers it updates in place and what they showed (:func:`.layer_updates.show_layer`).
    kept : list of (layer, str)
        Reviewed ROI layers kept aside for it and their names before
        (:func:`.kept_reviews.keep_reviewed`).
    steps : list of MagnifyStep
        Steps received.
    result : MagnifyResult or None
        The result, once received.
    """

    id: int
    request: RunRequest
    slide_layer: Any
    cancel_event: threading.Event = field(default_factory=threading.Event)
    # set in the worker thread once the run's source is closed (its work is over)
    done_event: threading.Event = field(default_factory=threading.Event)
    layers: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    kept: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    result: Any = None
    model_name: str = ""
    expected_steps: int = 0
    tissue: np.ndarray | None = None
    coverage: np.ndarray | None = None
    coverage_layer: Any = None
    worker: Any = None
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
    reuse_layers : bool
        Update the previous run's layers in place (default) instead of adding new ones and
        removing the previous ones on commit; also sets ``split_adds`` (see ``_show``).

    Signals
    -------
    status_changed(RunStatus)
        State, progress or status line changed.
    step_shown(int)
        A step's layers are all in the viewer (the number of steps shown).
    run_finished(str)
        A run ended: ``"committed"``, ``"cancelled"`` or ``"failed"``.
    roi_layer_added(layer)
        A run added (or updated) an ROI layer.
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
        reuse_layers: bool = True,
    ) -> None:
        self.viewer = viewer
        self.items = items
        self.reuse_layers = self.split_adds = bool(reuse_layers)
        self.queue = LayerQueue(on_error=self._fail, delay_ms=delay_ms)
        self.last_runs: dict[str, MagnifyRun] = {}
        self._state = RunState.IDLE
        self._run: MagnifyRun | None = None
        self._stopping: list[MagnifyRun] = []  # closed runs whose worker has not stopped yet
        self._shown, self._expected, self._message = 0, 0, ""

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
        """The worker of the run under way while it works, or ``None``."""
        run = self._run
        return run.worker if run is not None and not run.finished else None

    @property
    def stopping(self) -> int:
        """Workers of cancelled or failed runs that have not reached their next step yet."""
        return len(self._stopping)

    @property
    def is_running(self) -> bool:
        """Whether anything is under way: a run, or layer operations still queued (removing or
        restoring a cancelled or replaced run's layers). Detached workers do not count."""
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
        run.kept = keep_reviewed(self.viewer, request.slide_path)
        self._run = run
        self._shown, self._expected = 0, 0
        self._message = f"Magnifying with {request.model}…"
        worker = create_worker(
            guarded_items,
            self.items,
            request,
            run.cancel_event,
            run.done_event,
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.yielded.connect(lambda record, r=run: self._on_yielded(r, record))
        worker.errored.connect(lambda exc, r=run: self._on_errored(r, exc))
        worker.finished.connect(lambda r=run: self._on_finished(r))
        run.worker = worker
        self._set_state(RunState.LOADING)
        worker.start()
        return worker

    def cancel(self) -> bool:
        """Cancel the run at once (see the module docstring); returns whether it applied."""
        run = self._run
        if run is None or run.closed or self._state not in CANCELLABLE:
            return False
        run.cancelled = True
        self._close(run)
        return True

    def slide_removed(self, slide_layer: Any) -> None:
        """Cancel the run if it runs on ``slide_layer``."""
        if self._run is not None and self._run.slide_layer is slide_layer:
            self.cancel()

    def shutdown(self, wait_s: float = 0.0) -> bool:
        """Stop for good (the widget is going away, or napari quits).

        No signal is emitted any more, queued layer operations are dropped, the run under way
        is dropped without touching the viewer (whose widgets may be gone already) and every
        worker is asked to stop at its next step boundary; what they still report is ignored.

        Parameters
        ----------
        wait_s : float
            How long to wait for the workers to stop.

        Returns
        -------
        bool
            Whether every worker has stopped.
        """
        signals = (self.status_changed, self.step_shown, self.run_finished, self.roi_layer_added)
        for signal in (*signals, self.committed):
            signal.disconnect()
        self.queue.clear()
        runs = [run for run in (self._run, *self._stopping) if run is not None]
        for run in runs:
            run.cancelled = run.closed = True
            run.cancel_event.set()
        self._run, self._state = None, RunState.IDLE
        deadline = time.monotonic() + max(0.0, wait_s)
        stopped = [
            run.finished or run.done_event.wait(max(0.0, deadline - time.monotonic()))
            for run in runs
        ]
        return all(stopped)

    def remove_layers_later(self, layers: list) -> None:
        """Hide ``layers`` now; remove them in the next turn of the event loop, all in one
        batch (napari runs a full garbage collection after removing layers — ~0.5 s with torch
        loaded — once per batch instead of once per layer)."""
        later = discard_later(self.viewer, layers, [])
        if later is not None:
            self.queue.push(later)

    # -- worker signals --------------------------------------------------------------------
    def _on_yielded(self, run: MagnifyRun, record: Any) -> None:
        if run is not self._run or run.closed:
            return  # a detached worker's last records
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
        run.finished = True
        self._stopping = [other for other in self._stopping if other is not run]
        if run is not self._run or run.closed:
            return
        if run.result is None or run.shown >= len(run.steps):
            self._close(run)
        else:
            self._set_state(RunState.FINISHING)

    # -- layers ----------------------------------------------------------------------------
    def _push(self, run: MagnifyRun, action: Callable[[], Any]) -> None:
        """Queue ``action`` for ``run``: the layer it returns is recorded as the run's."""

        def checked() -> None:
            if run.slide_layer not in self.viewer.layers:
                raise RuntimeError(f"the slide layer {run.slide_layer.name!r} was removed")
            shown = action()
            if shown is not None and shown not in run.layers:
                run.layers.append(shown)

        self.queue.push(checked, owner=run)

    def _show(self, run: MagnifyRun, kind: str, layer_type: str, k: Any, make: Callable) -> Any:
        """The layer ``make(viewer)`` adds, or the previous run's layer it is written into.
        With ``split_adds``, the write, or the first draw of an added layer (shaders, textures:
        it is hidden until then), costs a turn of its own, the next one."""
        before = {layer_id(lyr) for lyr in self.viewer.layers}
        later = partial(self.queue.push_next, owner=run) if self.split_adds else None
        reuse = self.reuse_layers
        layer = show_layer(self.viewer, make, run, kind, layer_type, k, reuse=reuse, defer=later)
        if later is not None and layer_id(layer) not in before and layer.visible:
            layer.visible = False
            later(lambda: setattr(layer, "visible", True))
        if kind == "rois":
            self.roi_layer_added.emit(layer)
        return layer

    def _add_step(self, run: MagnifyRun, record: StepReady) -> None:
        """Queue the step's attention overlay, its ROI rectangles, then the bookkeeping."""
        step, data = record.step, record.data
        run.steps.append(step)
        run.coverage = data.coverage
        slide, k = run.slide_layer, step.layer

        def attention(viewer: Any) -> Any:
            return add_attention_layer(viewer, slide, data.attention, k, run.tag, data.n_maps)

        def rois(viewer: Any) -> Any:
            return add_roi_layer(viewer, slide, data.rois.rects, data.rois.features, k, run.tag)

        self._push(run, lambda: self._show(run, "attention", "image", k, attention))
        self._push(run, lambda: self._show(run, "rois", "shapes", k, rois))
        self._push(run, lambda: self._step_shown(run))

    def _step_shown(self, run: MagnifyRun) -> None:
        """After a step's layers: restack the slide's layers (:func:`.stack_run_layers`)."""
        stack_run_layers(self.viewer, run.slide_path)
        run.shown += 1
        self._shown = run.shown
        self._set_state()
        self.step_shown.emit(run.shown)
        if run.finished and run.alive and not run.closed and run.shown >= len(run.steps):
            self._close(run)

    def _discard(self, run: MagnifyRun) -> None:
        """Hide the layers ``run`` added now; next turn, put back the previous content of those
        it updated and remove the added ones (:func:`.layer_updates.discard_later`)."""
        later = discard_later(self.viewer, run.layers, run.reused)
        if later is not None:
            self.queue.push(later)
        run.layers, run.reused, run.coverage_layer = [], [], None

    # -- ending a run ----------------------------------------------------------------------
    def _fail(self, run: MagnifyRun, exc: BaseException) -> None:
        """Fail ``run`` at once: report it, discard its layers, back to idle."""
        if run.closed or not run.alive:
            return
        self._report_failure(run, exc)
        self._close(run)

    def _report_failure(self, run: MagnifyRun, exc: BaseException) -> None:
        from napari.utils.notifications import show_error

        run.failed = True
        run.error = describe_error(exc)
        self._message = f"Failed: {run.error}"
        show_error(
            f"napari-magnet: Magnify on {run.slide_layer.name} with {run.model} failed: {run.error}"
        )

    def _close(self, run: MagnifyRun) -> None:
        """Commit or discard ``run``, back to idle; a working worker is detached (stopping)."""
        if run.closed:
            return
        run.closed = True
        run.cancel_event.set()  # a worker still working stops at its next step boundary
        if not run.finished:
            self._stopping.append(run)
        outcome = "failed"
        if run.alive and run.result is not None:
            try:
                self._commit(run)
                outcome = "committed"
            except Exception as exc:  # noqa: BLE001 - reported, the viewer survives
                if self.last_runs.get(run.slide_path) is run:
                    del self.last_runs[run.slide_path]
                self._report_failure(run, exc)
        elif run.alive or run.cancelled:
            outcome = "cancelled"
            run.cancelled = True  # its still-queued layer operations are dropped
            self._message = "Cancelled: no layers kept"
            self._shown = 0
        if outcome != "committed":
            self._discard(run)
            if run.kept:  # after the discard: the names are free again
                self.queue.push(partial(release, self.viewer, run.kept))
                run.kept = []
        if run is self._run:
            self._run = None
        self._set_state(RunState.IDLE)
        self.run_finished.emit(outcome)

    def _commit(self, run: MagnifyRun) -> None:
        mine = {layer_id(layer) for layer in run.layers}
        cover = None
        if run.coverage is not None and self.reuse_layers:
            cover = reusable_layer(
                self.viewer, run.slide_path, "coverage", "labels", exclude=run.layers
            )
        old = [
            layer
            for layer in layers_of(self.viewer, run.slide_path, kinds=RUN_KINDS)
            if layer_id(layer) not in mine
            and (cover is None or layer != cover)
            and not is_kept(layer)
        ]
        self.remove_layers_later(old)
        if run.coverage is not None:
            self.queue.push(lambda: self._show_coverage(run))
        probability = None if run.result is None else run.result.probability
        for layer in run.layers:
            if layer_kind(layer) == "rois":
                mark_committed(layer)
                set_roi_probability(layer, probability)  # hovering an ROI shows p
        # plain names once the previous run's layers are gone
        self.queue.push(lambda: self._rename(run))
        self.last_runs[run.slide_path] = run
        if run.kept:
            announce_kept(run.kept, run.slide_layer.name)
        self.committed.emit(run)

    def _show_coverage(self, run: MagnifyRun) -> None:
        """Update the previous coverage layer (hidden or shown as the user left it) with the
        run's coverage, or add the layer (hidden) just above the slide."""
        viewer = self.viewer
        if run.slide_layer not in viewer.layers or self.last_runs.get(run.slide_path) is not run:
            return  # the slide is gone, or a newer run replaced this one meanwhile
        n_layers = max(run.expected_steps, len(run.steps))

        def make(viewer: Any) -> Any:
            return set_coverage_layer(viewer, run.slide_layer, run.coverage, n_layers, run.tag)

        run.coverage_layer = self._show(run, "coverage", "labels", None, make)
        run.layers.append(run.coverage_layer)

    def _rename(self, run: MagnifyRun) -> None:
        for layer in run.layers:
            if layer in self.viewer.layers:
                layer.name = base_name(layer.name)
