"""Every line of the Magnify widget is readable in a small napari window (Xvfb, the CMU slide,
the widget docked from the Plugins menu, a real run for the result line).

In a 1089 × 706 window the dock is shorter than the widget: each text line (the slide line,
the region line, the result line …) must then be reachable and shown whole — not squeezed
below the height its wrapped text needs, not cut by the dock. A screenshot of the window is
saved beside the test's files for a look.
"""

from __future__ import annotations

from qtpy.QtWidgets import QLabel, QScrollArea

from napari_magnet._napari.layers import layer_kind
from napari_magnet._napari.widget import demo_available

RUN_TIMEOUT = 240_000  # ms
WINDOW = (1089, 706)


def scroll_area_of(widget):
    """The scroll area ``widget`` is shown in, or ``None``."""
    parent = widget.parentWidget()
    while parent is not None and not isinstance(parent, QScrollArea):
        parent = parent.parentWidget()
    return parent


def test_every_line_is_readable_in_a_small_window(
    make_napari_viewer, qtbot, slide_copy, tmp_path, monkeypatch
):
    monkeypatch.setenv("NAPARI_MAGNET_DATA_DIR", str(tmp_path / "data"))
    viewer = make_napari_viewer(show=True)
    viewer.open(str(slide_copy), plugin="napari-magnet")
    _, widget = viewer.window.add_plugin_dock_widget("napari-magnet", "Magnify")
    viewer.window.resize(*WINDOW)
    qtbot.waitUntil(
        lambda: any(layer_kind(lyr) == "annotations" for lyr in viewer.layers), timeout=10_000
    )
    widget.set_model("demo" if demo_available() else "magnet3-lite")
    widget.set_device("cpu")
    assert widget.run_magnify() is not None
    qtbot.waitUntil(lambda: not widget.is_running, timeout=RUN_TIMEOUT)
    qtbot.wait(300)
    window = widget.window()
    assert (window.width(), window.height()) == WINDOW
    assert " p = " in widget.result_label.text()  # a long line: it wraps in the narrow dock
    shot = viewer.screenshot(canvas_only=False, flash=False)
    from imageio.v3 import imwrite

    imwrite(tmp_path / "narrow-dock.png", shot)

    lines = [lab for lab in widget.findChildren(QLabel) if lab.isVisible() and lab.text()]
    named = {widget.slide_info_label, widget.region_label, widget.result_label}
    assert named <= set(lines)
    for label in lines:
        area = scroll_area_of(label)
        if area is not None:
            area.ensureWidgetVisible(label, 0, 0)
        qtbot.wait(20)
        what = f"{label.text()[:40]!r}"
        if label.wordWrap():  # not squeezed: every wrapped line has its height
            assert label.height() >= label.heightForWidth(label.width()), what
        # shown whole: neither the dock nor the window cuts it
        assert label.visibleRegion().boundingRect() == label.rect(), what
        assert window.rect().contains(label.mapTo(window, label.rect().bottomRight())), what
