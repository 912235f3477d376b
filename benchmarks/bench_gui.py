"""P5: the viewer stays responsive during a Magnify and during a pan at level 0.

A 10 ms ``QTimer`` ticks in the GUI thread; the gaps between its ticks are the time the event
loop was busy (or starved of the GIL) and could not react to the user. Measured in a fresh
napari process (under ``xvfb-run`` when there is no display) on the generated slide:

* idle, for reference;
* a Magnify through the widget (``magnet3-lite`` by default: ``NAPARI_MAGNET_BENCH_MODEL``;
  CPU unless CUDA is available), cold (first run in the process: model build, torchvision
  import) and warm (a second run, which also replaces the first run's layers);
* a scripted pan: the camera at level-0 zoom (one screen pixel per level-0 pixel) moves its
  centre across the slide in 100 steps, one every 40 ms, decoding tiles as it goes.

Goal: the longest gap ≤ 50 ms. Reported: max, p99 and median gaps, and the number of gaps
over 50 ms.

Run: ``python -m benchmarks.run gui`` (``NAPARI_MAGNET_BENCH_SIDE=20000`` for a smaller slide);
the measuring child is ``python -m benchmarks.bench_gui --child OUT.json SLIDE``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import BIG_SIDE, Section, big_slide_path

ROOT = Path(__file__).resolve().parent.parent
XVFB = ["xvfb-run", "-a", "-s", "-screen 0 1600x1200x24"]
TICK_MS = 10
GOAL_MS = 50.0
PAN_STEPS = 100
PAN_INTERVAL_MS = 40
MODEL = os.environ.get("NAPARI_MAGNET_BENCH_MODEL", "magnet3-lite")


# ------------------------------------------------------------------------------ the child


def _child(out: Path, slide_path: Path) -> None:
    """Measure in this process (needs a display) and write the gaps as JSON."""
    import napari
    from qtpy.QtCore import QEventLoop, Qt, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_magnet._napari.widget import add_magnify_widget, avoid_triton_llvm_clash

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    app = QApplication.instance()
    data_dir = tempfile.mkdtemp(prefix="bench_gui_")
    widget = add_magnify_widget(viewer, data_dir=data_dir)
    (slide_layer,) = viewer.open(str(slide_path), plugin="napari-magnet")
    slide = slide_layer.metadata["slide"]
    mpp_x, mpp_y = slide.metadata()["mpp"] or (1.0, 1.0)
    width, height = slide.dimensions

    def spin(seconds: float = 0.0, until=None, timeout: float = 1800.0) -> None:
        """Run the real Qt event loop (no polling gaps of our own)."""
        loop = QEventLoop()
        start = time.perf_counter()

        def check():
            elapsed = time.perf_counter() - start
            if (
                (until is None and elapsed >= seconds)
                or (until is not None and until())
                or elapsed > timeout
            ):
                loop.quit()

        poll = QTimer()
        poll.setInterval(20)
        poll.timeout.connect(check)
        poll.start()
        loop.exec_()
        poll.stop()

    ticks: list[float] = []
    timer = QTimer()
    timer.setTimerType(Qt.PreciseTimer)
    timer.setInterval(TICK_MS)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))

    def measure(action, until, seconds: float = 0.0) -> dict:
        ticks.clear()
        timer.start()
        spin(0.2)
        t0 = time.perf_counter()
        action()
        spin(seconds, until)
        wall = time.perf_counter() - t0
        spin(0.2)
        timer.stop()
        gaps = np.diff(np.asarray(ticks)) * 1000.0
        return {"gaps_ms": gaps.tolist(), "wall_s": wall}

    viewer.reset_view()
    spin(2.0)  # first frame and its tiles
    avoid_triton_llvm_clash()
    results: dict = {
        "slide": str(slide_path),
        "dimensions": [width, height],
        "model": MODEL,
        "device": "auto",
    }
    results["idle"] = measure(lambda: None, None, 3.0)

    widget.set_model(MODEL)
    widget.set_device("auto")
    for label in ("magnify_cold", "magnify_warm"):
        results[label] = measure(widget.run_magnify, lambda: not widget.is_running)
        results[label]["result"] = widget.result_label.text()

    # pan at level 0: one screen pixel per level-0 pixel, across the slide's middle row
    for layer in viewer.layers:
        if layer is not slide_layer:
            layer.visible = False  # the slide's own tiles are what panning costs
    viewer.camera.zoom = 1.0 / mpp_x
    row = height / 2 * mpp_y
    cols = np.linspace(0.1 * width * mpp_x, 0.9 * width * mpp_x, PAN_STEPS)
    viewer.camera.center = (row, cols[0])
    spin(2.0)
    state = {"i": 0}
    pan = QTimer()
    pan.setInterval(PAN_INTERVAL_MS)

    def step():
        i = state["i"]
        if i < PAN_STEPS:
            viewer.camera.center = (row, float(cols[i]))
            state["i"] = i + 1

    pan.timeout.connect(step)
    results["pan"] = measure(pan.start, lambda: state["i"] >= PAN_STEPS)
    pan.stop()
    results["pan"]["step_level0_px"] = float((cols[1] - cols[0]) / mpp_x)
    results["canvas"] = list(viewer.window._qt_viewer.canvas.size)
    out.write_text(json.dumps(results))
    shutil.rmtree(data_dir, ignore_errors=True)
    viewer.close()
    app.quit()


# ------------------------------------------------------------------------------ the parent


def _stats(gaps: list[float]) -> tuple[float, float, float, int]:
    g = np.asarray(gaps, dtype=float)
    if g.size == 0:
        return (float("nan"),) * 3 + (0,)  # type: ignore[return-value]
    return (
        float(g.max()),
        float(np.percentile(g, 99)),
        float(np.median(g)),
        int((g > GOAL_MS).sum()),
    )


def run() -> list[Section]:
    path = big_slide_path()
    section = Section(
        title="P5 — GUI responsiveness during Magnify and panning",
        goal=f"longest gap between ticks of a {TICK_MS} ms QTimer in the GUI thread "
        f"≤ {GOAL_MS:.0f} ms",
        header=[
            "scenario",
            "max gap (ms)",
            "p99 (ms)",
            "median (ms)",
            f"gaps > {GOAL_MS:.0f} ms",
            "wall (s)",
            "goal met",
        ],
    )
    if not os.environ.get("DISPLAY") and not shutil.which("xvfb-run"):
        section.notes.append("SKIPPED: no DISPLAY and no xvfb-run")
        return [section]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p5.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_gui", "--child", str(out), str(path)]
        if not os.environ.get("DISPLAY"):
            cmd = XVFB + cmd
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"P5 child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-3000:]}"
            )
        res = json.loads(out.read_text())
    labels = {
        "idle": "idle (reference)",
        "magnify_cold": f"Magnify {res['model']} (first run: model build, imports)",
        "magnify_warm": f"Magnify {res['model']} (second run, replaces the first's layers)",
        "pan": f"pan at level-0 zoom, {PAN_STEPS} steps of "
        f"{res['pan']['step_level0_px']:.0f} px every {PAN_INTERVAL_MS} ms",
    }
    for key, label in labels.items():
        mx, p99, med, over = _stats(res[key]["gaps_ms"])
        section.rows.append(
            [
                label,
                f"{mx:.0f}",
                f"{p99:.0f}",
                f"{med:.1f}",
                str(over),
                f"{res[key]['wall_s']:.1f}",
                "yes" if mx <= GOAL_MS else "no",
            ]
        )
    w, h = res["dimensions"]
    section.notes += [
        f"Slide: {w:,} × {h:,} px generated ({Path(res['slide']).name}; BIG_SIDE={BIG_SIDE}); "
        f"canvas {res['canvas'][0]} × {res['canvas'][1]} px; napari in a fresh process "
        "(software OpenGL under Xvfb when no display).",
        f"Results: cold run: {res['magnify_cold']['result']}; warm run: "
        f"{res['magnify_warm']['result']}",
        "The run itself is a thread_worker generator (model, tissue mask, coverage and layer "
        "data are computed in the worker); the GUI thread only adds the step's layers, one "
        "per turn of the event loop (2 per step: composite attention + ROIs; coverage once "
        "at the end), and removes a replaced run's layers in one batch. What remains in the "
        "GUI thread is napari's own cost of adding a layer (~0.1–0.3 s here: layer controls, "
        "vispy visual and shader build, a software-GL redraw), of removing layers (napari "
        "runs a full gc.collect per removal batch, ~0.5 s with torch loaded), and GIL "
        "contention with the worker's Python code.",
        "Panning decodes level-0 tiles synchronously in napari's draw (napari's async slicing "
        "is experimental and off by default); the gap of a step is the decode of the tiles "
        "it reveals.",
    ]
    return [section]


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--child":
        _child(Path(argv[1]), Path(argv[2]))
        return 0
    for s in run():
        print(s.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
