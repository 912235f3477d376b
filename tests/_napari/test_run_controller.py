"""The run controller's state machine, driven by a scripted worker (no model, no slide file)."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

from napari_magnet._napari.layer_queue import LayerQueue
from napari_magnet._napari.layer_updates import snapshot
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
        "fake · L2 attention",
        "fake · L1 ROIs",
        "fake · L2 ROIs",
    ]  # every outline above every overlay
    assert all(layer_info(lyr)["committed"] for lyr in viewer.layers if layer_kind(lyr) == "rois")
    status = controller.status
    assert (status.shown, status.expected) == (2, 2)
    assert status.message.startswith("scripted: p = 0.250 (label 0) · 2.0 M px processed")
    # the slide layer stays the selected one
    assert viewer.layers.selection.active is None or viewer.layers.selection.active is slide


def rois_of(viewer, k=None):
    return [
        lyr
        for lyr in viewer.layers
        if layer_kind(lyr) == "rois" and (k is None or layer_info(lyr)["layer"] == k)
    ]


def test_a_second_run_updates_the_first_runs_layers_in_place(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    feed.put(ModelLoaded("scripted", 2), step(1), step(2), result(), STOP)
    start()
    wait_idle()
    first = {lyr.name: lyr for lyr in viewer.layers}
    inserted = []
    viewer.layers.events.inserted.connect(lambda e: inserted.append(e.value))
    feed.put(ModelLoaded("scripted", 1), step(1, 3), result(), STOP)
    start()
    run = controller.current_run
    wait_idle()
    assert outcomes == ["committed", "committed"] and not inserted
    names = ["fake", "fake · coverage", "fake · L1 attention", "fake · L1 ROIs"]
    assert [lyr.name for lyr in viewer.layers] == names
    # the same layer objects, now showing the second run (layer 2's went: it has none)
    assert all(first[name] is viewer.layers[name] for name in names)
    (rois,) = rois_of(viewer)
    assert rois.nshapes == 3 and list(rois.features["id"]) == ["1", "2", "3"]
    assert list(rois.text.values) == ["1", "2", "3"]
    assert layer_info(rois)["run"] == run.tag and layer_info(rois)["committed"] is True
    assert layer_info(viewer.layers["fake · coverage"])["run"] == run.tag
    assert not viewer.layers["fake · coverage"].visible  # hidden, as added


def test_without_reuse_a_second_run_adds_layers_and_removes_the_first_runs(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    controller.reuse_layers = False
    feed.put(ModelLoaded("scripted", 1), step(1), result(), STOP)
    start()
    wait_idle()
    first = set(viewer.layers) - {slide}
    feed.put(ModelLoaded("scripted", 1), step(1, 3), result(), STOP)
    start()
    wait_idle()
    assert not first & set(viewer.layers)
    (rois,) = rois_of(viewer)
    assert rois.nshapes == 3 and rois.name == "fake · L1 ROIs"
    assert outcomes == ["committed", "committed"]


def test_cancel_and_failure_put_the_previous_results_back(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    feed.put(ModelLoaded("scripted", 2), step(1), step(2), result(), STOP)
    start()
    first_run = controller.current_run
    wait_idle()
    before = {lyr.name: (lyr, snapshot(lyr)) for lyr in viewer.layers}
    for ending in ("cancel", "fail"):
        feed.put(ModelLoaded("scripted", 3), step(1, 5))
        start()
        qtbot.waitUntil(lambda: controller.status.shown == 1, timeout=TIMEOUT)
        (l1,) = rois_of(viewer, 1)
        assert l1 is before["fake · L1 ROIs"][0] and l1.nshapes == 5
        if ending == "cancel":
            assert controller.cancel() is True
        else:
            feed.put(RuntimeError("boom"))
        qtbot.waitUntil(lambda: controller.state is RunState.IDLE, timeout=TIMEOUT)
        wait_idle()
        if ending == "cancel":
            feed.put(STOP)  # the detached worker stops
        qtbot.waitUntil(lambda: controller.stopping == 0, timeout=TIMEOUT)
        assert [lyr.name for lyr in viewer.layers] == list(before)
        for name, (lyr, _) in before.items():
            assert viewer.layers[name] is lyr
            if name != "fake":
                assert layer_info(lyr)["run"] == first_run.tag
        assert l1.nshapes == 2 and layer_info(l1)["committed"] is True
        assert list(l1.text.values) == ["1", "2"]
    assert outcomes == ["committed", "cancelled", "failed"]
    assert controller.last_runs["/nowhere/fake.svs"] is first_run


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
    feed.put(step(1))
    qtbot.waitUntil(lambda: controller.status.shown == 1, timeout=TIMEOUT)
    assert len(run_layers(viewer, controller.current_run)) == 2
    return lambda: feed.put(step(2), STOP)


@pytest.mark.parametrize("state", list(RunState), ids=lambda s: s.value)
def test_cancel_in_each_state_is_immediate_and_keeps_nothing(rig, qtbot, state):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    release = drive_to(state, rig, qtbot)
    run = controller.current_run
    before = controller.state
    applied = controller.cancel()
    assert applied is (before in (RunState.LOADING, RunState.RUNNING))
    if applied:
        # idle at once, the worker detached (told to stop at its next step boundary)
        assert controller.state is RunState.IDLE and outcomes == ["cancelled"]
        assert not controller.status.can_cancel and controller.current_run is None
        assert controller.status.message == "Cancelled: no layers kept"
        assert run.cancelled and run.cancel_event.is_set() and controller.stopping == 1
        # hidden at once, removed in a later turn of the event loop
        assert not any(lyr.visible for lyr in run_layers(viewer, run))
    release()
    wait_idle()
    qtbot.waitUntil(lambda: controller.stopping == 0, timeout=TIMEOUT)
    assert [lyr.name for lyr in viewer.layers] == ["fake"]
    assert not controller.last_runs
    assert outcomes == ([] if state is RunState.IDLE else ["cancelled"])
    if state is not RunState.IDLE:
        assert feed.closed.is_set() and (run is None or run.finished)


def test_a_new_run_starts_while_a_cancelled_worker_is_still_stopping(rig, qtbot):
    viewer, slide, feed, controller, states, outcomes, start, wait_idle = rig
    feed.put(ModelLoaded("scripted", 2))
    start()
    qtbot.waitUntil(lambda: controller.state is RunState.RUNNING, timeout=TIMEOUT)
    old = controller.current_run
    controller.cancel()  # the worker is blocked in its step: it cannot stop yet
    wait_idle()
    assert controller.stopping == 1 and not old.finished
    controller.items = second = Feed()
    second.put(ModelLoaded("scripted", 1), step(1, 3), result(), STOP)
    start()
    wait_idle()
    # the old worker's late step is never yielded; it stops when resumed
    feed.put(step(1, 7), STOP)
    qtbot.waitUntil(lambda: controller.stopping == 0, timeout=TIMEOUT)
    assert outcomes == ["cancelled", "committed"]
    (rois,) = rois_of(viewer)
    assert rois.nshapes == 3


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
    assert states[-2:] == [RunState.RUNNING, RunState.IDLE]
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
    assert controller.state is RunState.IDLE and outcomes == ["cancelled"]
    feed.put(STOP)
    wait_idle()


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
    assert not RunStatus(RunState.IDLE).can_cancel and RunStatus(RunState.LOADING).busy
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


# --------------------------------------------------------------------------------------------
# in-place layer updates
# --------------------------------------------------------------------------------------------


def test_layers_are_written_in_place_and_put_back(make_napari_viewer):
    from napari_magnet._napari.layer_updates import build_detached, same, write_into

    viewer = make_napari_viewer()
    square = np.array([[0, 0], [0, 5], [5, 5], [5, 0]], float)
    img = viewer.add_image(np.zeros((4, 6)), contrast_limits=(0, 1), scale=(2, 2), name="att")
    rois = viewer.add_shapes(
        [square, square + 1],
        shape_type="rectangle",
        features={"id": ["1", "2"]},
        text={"string": "{id}", "size": 9},
        edge_width=3,
        name="rois",
    )
    cov = viewer.add_labels(np.zeros((3, 3), np.uint8), visible=False, name="cov")
    before = [snapshot(lyr) for lyr in (img, rois, cov)]
    opacity = img.opacity = 0.3  # the user's: kept
    fresh = [
        build_detached(
            lambda v: v.add_image(
                np.ones((8, 9)), contrast_limits=(0, 5), scale=(3, 3), translate=(1, 1)
            ),
        ),
        build_detached(
            lambda v: v.add_shapes(
                [square + i for i in range(3)],
                shape_type="rectangle",
                features={"id": ["a", "b", "c"]},
                text={"string": "{id}", "size": 5},
                edge_width=[1, 2, 3],
            ),
        ),
        build_detached(lambda v: v.add_labels(np.ones((5, 5), np.uint8))),
    ]
    assert [lyr.name for lyr in viewer.layers] == ["att", "rois", "cov"]  # none added
    for target, source in zip((img, rois, cov), fresh):
        assert write_into(target, source) is target
    assert img.data.shape == (8, 9) and list(img.contrast_limits) == [0, 5]
    assert tuple(img.translate) == (1, 1) and img.opacity == opacity
    assert rois.nshapes == 3 and rois.shape_type == ["rectangle"] * 3
    assert list(rois.text.values) == ["a", "b", "c"] and rois.text.size == 5
    assert list(rois.edge_width) == [1, 2, 3]
    assert cov.data.shape == (5, 5) and not cov.visible  # the user's visibility: kept
    with pytest.raises(TypeError):
        write_into(img, fresh[1])
    for target, previous in zip((img, rois, cov), before):
        write_into(target, previous)
    assert img.data.shape == (4, 6) and list(img.contrast_limits) == [0, 1]
    assert rois.nshapes == 2 and list(rois.text.values) == ["1", "2"]
    assert list(rois.edge_width) == [3, 3] and cov.data.shape == (3, 3)
    assert same({"a": (1, 2)}, {"a": np.array([1, 2])}) and not same([1, 2], [1, 2, 3])
    assert not same(np.zeros(2), "x") and same(None, None)
