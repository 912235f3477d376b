"""Closing napari at any moment of a Magnify run is silent and leaves no worker running
(Xvfb, the CMU slide, the widget docked from the Plugins menu, the shipped demo model).

A sweep of delays after a second Magnify (the first one's results on the slide); then Cancel (or not) and, at once, the viewer closed
(``viewer.close()``: the slide goes first, then the window) or the dock deleted with the
widget in it, the viewer and its slide staying (as when napari's window is closed with its
close button: the widgets go, the layers stay), while the worker is still stopping (or still
working). Any exception from a Qt slot, a thread or a
finalizer, or a "has been deleted" message, fails the test; so does a worker thread still
running shortly after the close.
"""

from __future__ import annotations

import sys
import threading

import pytest
from qtpy.QtCore import QThreadPool

from napari_magnet._napari.layers import layer_kind
from napari_magnet._napari.run_controller import RunState
from napari_magnet._napari.widget import STOP_WAIT_S, demo_available

DELAYS_MS = (0, 400, 1200)
RUN_TIMEOUT = 240_000  # ms: the first run imports torch and builds the model
MODEL = "demo" if demo_available() else "magnet3-lite"


def open_and_start(make_napari_viewer, qtbot, slide_copy):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(slide_copy), plugin="napari-magnet")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-magnet", "Magnify")
    qtbot.waitUntil(
        lambda: any(layer_kind(lyr) == "annotations" for lyr in viewer.layers), timeout=10_000
    )
    widget.set_model(MODEL)
    widget.set_device("cpu")
    # earlier results: the run writes into them, a cancelled run puts them back
    assert widget.run_magnify() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    assert widget.run_magnify() is not None
    return viewer, dock, widget


@pytest.mark.parametrize("cancel", [True, False], ids=["cancelled", "running"])
@pytest.mark.parametrize("route", ["viewer.close", "dock deleted"])
def test_closing_while_a_run_stops_is_silent_and_leaves_no_thread(
    make_napari_viewer, qtbot, slide_copy, tmp_path, monkeypatch, capfd, route, cancel
):
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    raised = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: raised.append(u.exc_value))
    monkeypatch.setattr(threading, "excepthook", lambda a: raised.append(a.exc_value))
    pool = QThreadPool.globalInstance()
    states = []
    for delay in DELAYS_MS:
        with qtbot.capture_exceptions() as in_slots:
            viewer, dock, widget = open_and_start(make_napari_viewer, qtbot, slide_copy)
            qtbot.wait(delay)
            states.append(widget.state)
            if cancel:
                widget.cancel_button.click()
            if route == "viewer.close":
                viewer.close()
            else:
                dock.deleteLater()
            # the worker stops at its next step boundary: no thread is left behind
            qtbot.waitUntil(lambda: pool.activeThreadCount() == 0, timeout=1000 * STOP_WAIT_S)
            qtbot.wait(1500)  # whatever the worker had queued is delivered now
        label = f"{route}, {'cancelled' if cancel else 'running'}, after {delay} ms"
        assert not in_slots, (label, [str(e[1]) for e in in_slots])
        assert not raised, (label, raised)
        out, err = capfd.readouterr()
        assert "has been deleted" not in out + err, (label, err[-2000:])
    # the sweep closed during runs under way, not only after them
    assert RunState.RUNNING in states or RunState.LOADING in states, states
