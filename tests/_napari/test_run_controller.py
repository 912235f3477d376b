"""The run controller's state machine, driven by a scripted worker (no model, no slide file)."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

from napari_magnet._napari.layer_queue import LayerQueue
from napari_magnet._napari.layers import layer_info, layer_kind
from napari_magnet._napari.run_controller import (
    RunController,
    RunState,
    RunStatus,
    guarded_items,
    summarize_result,
)
from napari_magnet._napari.run_worker import (
    MagnifyFailed,
    ModelLoaded,
    RunCompleted,
    RunRequest,
    StepReady,
    describe_error,
)
from napari_magnet.engine.types import MagnifyResult, MagnifyStep
from napari_magnet.io.layerdata import step_layer_data

TIMEOUT = 20_000  # ms
DIMS = (960, 640)  # level-0 (width, height) of the fake slide
MPP = (0.5, 0.5)
STOP = object()


class FakeSlide:
    dimensions = DIMS


class Feed:
    """The worker's records, fed one by one by the test (an exception is raised, STOP ends)."""

    def __init__(self) -> None:
        self.items: queue.Queue = queue.Queue()
        self.closed = threading.Event()
        self.closed_in: threading.Thread | None = None

    def put(self, *items) -> None:
        for item in items:
            self.items.put(item)

    def __call__(self, request):
        try:
            while True:
                item = self.items.get(timeout=30)
                if item is STOP:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed_in = threading.current_thread()
            self.closed.set()


def step(layer: int, n: int = 2) -> StepReady:
    ids = [str(i + 1) if layer == 1 else f"1.{i + 1}" for i in range(n)]
    boxes = np.array([[100 * i, 50, 100 * i + 80, 130] for i in range(n)], float)
    s = MagnifyStep(
        layer=layer,
        region_ids=ids,
        parent_ids=[""] * n if layer == 1 else ["1"] * n,
        boxes=boxes,
        levels=np.zeros(n, int),
        attention_maps=[np.random.default_rng(layer).random((8, 12))],
        attention_boxes=np.array([[0, 0, DIMS[0], DIMS[1]]], float),
    )
    return StepReady(s, step_layer_data(s, MPP, DIMS, [s]))


def result() -> RunCompleted:
    return RunCompleted(
        MagnifyResult(
            probability=0.25,
            label=0,
            pixels_processed=2_000_000,
            pixels_read=3_000,
            seconds=0.5,
            model_name="scripted",
            checkpoint_sha256="",
        )
    )


@pytest.fixture
def rig(make_napari_viewer, qtbot):
    """A viewer with a fake slide layer, a controller on a scripted worker, and a recorder."""
    viewer = make_napari_viewer()
    slide = viewer.add_image(
        np.zeros((DIMS[1], DIMS[0]), np.uint8),
        scale=MPP[::-1],
        metadata={"slide": FakeSlide(), "path": "/nowhere/fake.svs", "mpp": MPP},
        name="fake",
    )
    feed = Feed()
    controller = RunController(viewer, items=feed)
    states, outcomes = [], []
    controller.status_changed.connect(
        lambda status: (
            states.append(status.state) if not states or states[-1] != status.state else None
        )
    )
    controller.run_finished.connect(outcomes.append)

    def start():
        request = RunRequest(
            slide=slide.metadata["slide"],
            slide_path="/nowhere/fake.svs",
            mpp=MPP,
            model="scripted",
            device="cpu",
        )
        worker = controller.start(slide, request)
        assert worker is not None
        return worker

    def wait_idle():
        qtbot.waitUntil(lambda: not controller.is_running, timeout=TIMEOUT)
        assert controller.state is RunState.IDLE
        assert controller.current_run is None and controller.worker is None

    yield viewer, slide, feed, controller, states, outcomes, start, wait_idle
    feed.put(STOP)  # never leave the worker waiting


def run_layers(viewer, run):
    return [lyr for lyr in viewer.layers if layer_info(lyr).get("run") == run.tag]


def test_a_run_streams_then_finishes_and_commits(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    shown = []
    controller.step_shown.connect(shown.append)
    feed.put(ModelLoaded("scripted", 2), step(1), step(2), result(), STOP)
    start()
    run = controller.current_run
    assert controller.state is RunState.LOADING and controller.is_running
    assert controller.status.can_cancel
    wait_idle()
    # the worker is done long before the six queued layer operations: FINISHING in between
    assert states == [RunState.LOADING, RunState.RUNNING, RunState.FINISHING, RunState.IDLE]
    assert outcomes == ["committed"] and shown == [1, 2]
    assert controller.last_runs["/nowhere/fake.svs"] is run and run.closed
    assert feed.closed.is_set() and feed.closed_in is not threading.main_thread()
    names = [lyr.name for lyr in viewer.layers]
    assert names == [
        "fake",
        "fake · coverage",
        "fake · L1 attention",
        "fake · L1 ROIs",
        "fake · L2 attention",
        "fake · L2 ROIs",
    ]
    assert all(layer_info(lyr)["committed"] for lyr in viewer.layers if layer_kind(lyr) == "rois")
    status = controller.status
    assert (status.shown, status.expected) == (2, 2)
    assert status.message.startswith("scripted: p = 0.250 (label 0) · 2.0 M px processed")
    # the slide layer stays the selected one
    assert viewer.layers.selection.active is None or viewer.layers.selection.active is slide


def test_a_second_run_replaces_the_first_when_it_commits(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    feed.put(ModelLoaded("scripted", 1), step(1), result(), STOP)
    start()
    wait_idle()
    first = set(viewer.layers) - {slide}
    feed.put(ModelLoaded("scripted", 1), step(1, 3), result(), STOP)
    start()
    wait_idle()
    assert not first & set(viewer.layers)
    (rois,) = [lyr for lyr in viewer.layers if layer_kind(lyr) == "rois"]
    assert rois.nshapes == 3 and rois.name == "fake · L1 ROIs"
    assert outcomes == ["committed", "committed"]


def drive_to(state, rig, qtbot):
    """Bring a run into ``state``; returns a function that lets its worker end."""
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    if state is RunState.IDLE:
        return lambda: None
    if state is RunState.LOADING:
        start()
        return lambda: feed.put(ModelLoaded("scripted", 1), STOP)
    if state is RunState.FINISHING:
        # cancel from inside the transition: the worker is done, layers are still queued
        seen = []

        def on_status(status: RunStatus):
            if status.state is RunState.FINISHING and not seen:
                seen.append(controller.cancel())

        controller.status_changed.connect(on_status)
        feed.put(ModelLoaded("scripted", 2), step(1), step(2), result(), STOP)
        start()
        qtbot.waitUntil(lambda: bool(seen), timeout=TIMEOUT)
        assert seen == [True]
        return lambda: None
    feed.put(ModelLoaded("scripted", 2))
    start()
    qtbot.waitUntil(lambda: controller.state is RunState.RUNNING, timeout=TIMEOUT)
    if state is RunState.RUNNING:
        feed.put(step(1))
        qtbot.waitUntil(lambda: controller.status.shown == 1, timeout=TIMEOUT)
        assert len(run_layers(viewer, controller.current_run)) == 2
    elif state is RunState.CANCELLING:
        assert controller.cancel() is True
    elif state is RunState.FAILING:
        broken = step(1)
        feed.put(StepReady(broken.step, None))  # its layers cannot be made
    qtbot.waitUntil(lambda: controller.state is state, timeout=TIMEOUT)
    return lambda: feed.put(STOP)


@pytest.mark.parametrize("state", list(RunState), ids=lambda s: s.value)
def test_cancel_in_each_state_returns_to_idle_and_keeps_nothing(rig, qtbot, state):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    release = drive_to(state, rig, qtbot)
    run = controller.current_run
    before = controller.state
    applied = controller.cancel()
    assert applied is (before in (RunState.LOADING, RunState.RUNNING))
    if applied:
        assert controller.state is RunState.CANCELLING
        assert not controller.status.can_cancel
        assert run.cancelled and run.cancel_event.is_set()
        # hidden at once, removed in a later turn of the event loop
        assert not any(lyr.visible for lyr in run_layers(viewer, run))
    release()
    wait_idle()
    assert [lyr.name for lyr in viewer.layers] == ["fake"]
    assert not controller.last_runs
    expected = {RunState.IDLE: [], RunState.FAILING: ["failed"]}.get(state, ["cancelled"])
    assert outcomes == expected
    if state is not RunState.IDLE:
        assert feed.closed.is_set()


def test_worker_errors_arrive_through_errored_even_runtime_errors(rig, qtbot):
    from napari.utils.notifications import notification_manager

    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    n0 = len(notification_manager.records)
    feed.put(ModelLoaded("scripted", 2), step(1))
    worker = start()
    errors = []
    worker.errored.connect(errors.append)
    feed.put(RuntimeError("CUDA out of memory. Tried"))
    wait_idle()
    assert outcomes == ["failed"]
    assert isinstance(errors[0], MagnifyFailed)
    assert isinstance(errors[0].error, RuntimeError)
    assert controller.status.message == (
        "Failed: RuntimeError: CUDA out of memory. Tried — try "
        "the CPU device, or close other GPU programs"
    )
    assert states[-2:] == [RunState.FAILING, RunState.IDLE]
    assert [lyr.name for lyr in viewer.layers] == ["fake"]
    messages = [str(n.message) for n in notification_manager.records[n0:]]
    assert any("Magnify on fake with scripted failed" in m for m in messages)
    # and the controller runs again
    feed.put(ModelLoaded("scripted", 1), step(1), result(), STOP)
    start()
    wait_idle()
    assert outcomes == ["failed", "committed"]


def test_a_run_without_result_is_discarded(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    feed.put(ModelLoaded("scripted", 2), step(1), STOP)
    start()
    wait_idle()
    assert outcomes == ["cancelled"]
    assert controller.status.message == "Cancelled: no layers kept"
    assert [lyr.name for lyr in viewer.layers] == ["fake"]


def test_start_is_refused_while_a_run_is_under_way(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    start()
    request = controller.current_run.request
    assert controller.start(slide, request) is None
    feed.put(ModelLoaded("scripted", 1), step(1), result(), STOP)
    wait_idle()
    assert outcomes == ["committed"]


def test_removing_the_slide_cancels_its_run(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    feed.put(ModelLoaded("scripted", 2))
    start()
    qtbot.waitUntil(lambda: controller.state is RunState.RUNNING, timeout=TIMEOUT)
    controller.slide_removed(slide)
    assert controller.state is RunState.CANCELLING
    feed.put(STOP)
    wait_idle()
    assert outcomes == ["cancelled"]


# --------------------------------------------------------------------------------------------
# plain parts
# --------------------------------------------------------------------------------------------


def test_guarded_items_stops_when_cancelled_and_wraps_errors():
    closed = []

    def items(request):
        try:
            yield 1
            yield 2
            raise RuntimeError("boom")
        finally:
            closed.append(True)

    cancel = threading.Event()
    gen = guarded_items(items, None, cancel)
    assert next(gen) == 1
    cancel.set()
    assert list(gen) == [] and closed == [True]

    gen = guarded_items(items, None, threading.Event())
    with pytest.raises(MagnifyFailed) as info:
        list(gen)
    assert isinstance(info.value.error, RuntimeError)
    assert describe_error(info.value) == "RuntimeError: boom"


def test_status_records_are_frozen_and_say_what_applies():
    status = RunStatus(RunState.FINISHING, 1, 3, "…")
    assert status.busy and status.can_cancel
    assert not RunStatus().busy and not RunStatus().can_cancel
    assert not RunStatus(RunState.CANCELLING).can_cancel
    with pytest.raises(AttributeError):
        status.shown = 2  # type: ignore[misc]


def test_summary_line():
    r = result().result
    assert summarize_result(r) == (
        "scripted: p = 0.250 (label 0) · 2.0 M px processed / 3.0 k px read · 0.5 s"
    )


def test_layer_queue_drops_dead_owners_and_reports_errors(qtbot):
    class Owner:
        alive = True

    done, errors = [], []
    q = LayerQueue(on_error=lambda owner, exc: errors.append((owner, exc)), delay_ms=1)
    live, dead = Owner(), Owner()
    q.push(lambda: done.append("live"), live)
    q.push(lambda: done.append("dead"), dead)
    q.push(lambda: 1 / 0, None)  # housekeeping errors are ignored
    q.push(lambda: 1 / 0, live)
    q.push(lambda: done.append("after"))
    dead.alive = False
    assert q.busy and len(q) == 5
    qtbot.waitUntil(lambda: not q.busy, timeout=TIMEOUT)
    assert done == ["live", "after"]
    assert len(errors) == 1 and errors[0][0] is live
    assert isinstance(errors[0][1], ZeroDivisionError)
