"""Layer operations run one per turn of the event loop (no Qt widgets; a Qt timer paces them).

napari needs 0.1 s or more to add a layer; adding a run's layers back to back would freeze the
viewer for seconds. :class:`LayerQueue` runs one queued operation, then lets the event loop
draw and handle input before the next one.

An operation belongs to an *owner* (a run) or to nobody (housekeeping: removing layers,
renaming them). An owner's operations are dropped once the owner is no longer ``alive`` (a
cancelled or failed run), and an operation that raises is reported to ``on_error(owner,
exc)``; housekeeping always runs and its errors (say, a layer already gone) are ignored.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from qtpy.QtCore import QTimer

#: Pause between two queued operations: a zero-delay timer would run them back to back before
#: other timers (and user input) get their turn.
DRAIN_DELAY_MS = 5


class LayerQueue:
    """A FIFO of layer operations, drained one per event-loop turn.

    Parameters
    ----------
    on_error : callable, optional
        ``on_error(owner, exc)`` for an owner's operation that raised.
    delay_ms : int
        Pause between two operations.
    """

    def __init__(
        self,
        on_error: Callable[[Any, BaseException], None] | None = None,
        delay_ms: int = DRAIN_DELAY_MS,
    ) -> None:
        self._on_error = on_error
        self.delay_ms = int(delay_ms)
        self._pending: deque[tuple[Any, Callable[[], Any]]] = deque()
        self._scheduled = False

    @property
    def busy(self) -> bool:
        """Whether operations are waiting."""
        return bool(self._pending)

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, action: Callable[[], Any], owner: Any = None) -> None:
        """Queue ``action`` (run with no arguments) for ``owner`` (``None``: housekeeping)."""
        self._pending.append((owner, action))
        self._schedule()

    def push_next(self, action: Callable[[], Any], owner: Any = None) -> None:
        """Queue ``action`` before every waiting operation (it runs in the next turn)."""
        self._pending.appendleft((owner, action))
        self._schedule()

    def clear(self) -> None:
        """Drop every waiting operation (nothing of them runs)."""
        self._pending.clear()

    def _schedule(self) -> None:
        if not self._scheduled and self._pending:
            self._scheduled = True
            QTimer.singleShot(self.delay_ms, self._drain_one)

    def _drain_one(self) -> None:
        """Run one queued operation (skipping those of owners gone), then yield."""
        self._scheduled = False
        while self._pending:
            owner, action = self._pending.popleft()
            if owner is None:
                with contextlib.suppress(Exception):  # e.g. the layer is already gone
                    action()
                break
            if not getattr(owner, "alive", True):
                continue  # dropped: its run is gone
            try:
                action()
            except Exception as exc:  # a broken step must not take napari down
                if self._on_error is None:
                    raise
                self._on_error(owner, exc)
            break
        self._schedule()


@contextlib.contextmanager
def keep_selection(viewer: Any) -> Iterator[None]:
    """Add layers inside this block without changing the user's layer selection.

    napari makes each added layer the active one; the selection and the active layer from
    before the block are put back (public ``viewer.layers.selection`` API), so the layer the
    user is drawing in stays active.

    Parameters
    ----------
    viewer : napari.Viewer
        The viewer whose selection is kept.
    """
    layers = viewer.layers
    active, selected = layers.selection.active, set(layers.selection)
    try:
        yield
    finally:
        if set(layers.selection) != selected or layers.selection.active != active:
            layers.selection.clear()
            layers.selection.update({x for x in selected if x in layers})
            if active is not None and active in layers:
                layers.selection.active = active
