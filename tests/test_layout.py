"""The three widgets docked together fit a 1280 × 800 screen and leave the canvas room."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gui

WIDGETS = ("Stain normalization", "Classify white cells", "Train classifier from annotations")
LONG = (
    "⚠ too few: basophil: only 1 cell (at least 5 recommended); eosinophil: only 2 cells "
    "(at least 5 recommended); ig: only 1 cell (at least 5 recommended); platelet: only 3 "
    "cells (at least 5 recommended)"
)


def settle(qtbot, ms: int = 300) -> None:
    qtbot.wait(ms)


def test_all_widgets_docked_fit_1280x800_with_half_the_width_for_the_canvas(
    make_napari_viewer, qtbot, tmp_path
):
    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-wbc", "smear")
    docked = {
        name: viewer.window.add_plugin_dock_widget("napari-wbc", name)[1] for name in WIDGETS
    }
    window = viewer.window._qt_window
    window.resize(1280, 800)
    settle(qtbot)
    # Long one-line messages wrap instead of widening the dock.
    train = docked["Train classifier from annotations"]
    train.counts.value = LONG
    train.status.value = LONG
    docked["Classify white cells"].status.value = LONG
    settle(qtbot)
    window.resize(1280, 800)
    settle(qtbot)
    path = tmp_path / "docked.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    canvas = viewer.window._qt_viewer.canvas.native
    size = window.size()
    assert size.height() <= 800, f"window grew to {size.width()} × {size.height()}"
    assert size.width() <= 1280, f"window grew to {size.width()} × {size.height()}"
    assert canvas.width() >= size.width() / 2, (
        f"canvas {canvas.width()} px of a {size.width()} px window"
    )
    assert canvas.height() >= 400
    assert path.stat().st_size > 10_000
