"""``napari-magnet demo``: the sample slide, the Magnify widget and one run.

With a display the viewer stays open for the user. Headless (under Xvfb, as ``make demo``
runs it without a display) it waits for the run, saves a screenshot and exits.
"""

from __future__ import annotations

import time
from pathlib import Path


def _wait(app, condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        app.processEvents()
        time.sleep(0.02)
    return True


def run_demo(
    headless: bool, out_dir: Path, model: str | None = None, timeout: float = 600.0
) -> int:
    """Open the viewer with the small synthetic slide and run Magnify on it.

    Parameters
    ----------
    headless : bool
        Save a screenshot into ``out_dir`` and exit instead of handing the viewer to the user.
    out_dir : Path
        Folder for the screenshot.
    model : str, optional
        Model to run; default ``demo`` when shipped, else ``magnet3-lite`` (random weights).
    timeout : float
        Seconds to wait for the run when headless.
    """
    import napari
    from qtpy.QtWidgets import QApplication

    from ..slide.samples import sample_path
    from .widget import add_magnify_widget, demo_available

    print("Preparing the sample slide (generated once into the user cache)…", flush=True)
    path = sample_path("small")
    viewer = napari.Viewer(title="napari-magnet demo")
    if headless:
        viewer.window.resize(1600, 1000)
    viewer.open(str(path), plugin="napari-magnet")
    widget = add_magnify_widget(viewer)
    chosen = model or ("demo" if demo_available() else "magnet3-lite")
    widget.set_model(chosen)
    widget.run_magnify()
    if not headless:
        napari.run()
        return 0
    app = QApplication.instance()
    finished = _wait(app, lambda: not widget.is_running, timeout)
    viewer.reset_view()
    _wait(app, lambda: False, 1.0)  # let the canvas draw the last layers
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / "demo.png"
    viewer.screenshot(str(shot), canvas_only=False, flash=False)
    print(widget.result_label.text())
    print(f"Screenshot saved to {shot.resolve()}")
    widget.shutdown()
    viewer.close()
    return 0 if finished else 1
