"""What the viewer tests share: our layers of a kind, a Magnify run waited for, a hover."""

from __future__ import annotations

from napari_magnet._napari.layers import layer_kind

RUN_TIMEOUT = 240_000  # ms: a cold first run imports torchvision and builds the model


def ours(viewer, kind):
    """Our layers of ``kind`` (``"rois"``, ``"attention"``, ``"annotations"`` …), bottom first."""
    return [lyr for lyr in viewer.layers if layer_kind(lyr) == kind]


def run_and_wait(qtbot, widget, model="magnet3-lite", device="cpu", timeout=RUN_TIMEOUT):
    """Start Magnify from the widget and wait until the run has ended."""
    widget.set_model(model)
    widget.set_device(device)
    assert widget.run_magnify() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=timeout)


class _Move:
    """The mouse-move event napari's own dispatch passes to layers' callbacks."""

    def __init__(self, position):
        self.position = position
        self.type = "mouse_move"
        self.is_dragging = False
        self.modifiers = []
        self.handled = False


def hover(viewer, position):
    """Move the mouse to world ``position`` through napari's mouse-move dispatch."""
    from napari.utils.interactions import mouse_move_callbacks

    mouse_move_callbacks(viewer, _Move(tuple(position)))
