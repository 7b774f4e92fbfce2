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


def fully_visible(widget) -> bool:
    """Whether a widget is drawn whole: its visible region is its whole rectangle."""
    shown = widget.visibleRegion().boundingRect()
    return widget.isVisible() and shown.size() == widget.size() and not shown.isEmpty()


def test_three_docks_at_1280x800_show_their_buttons_status_and_every_count_row(
    make_napari_viewer, qtbot
):
    """Issue #33: Run, Train, Teach, the statuses and the whole count table in view, no scrolling."""
    import pandas as pd

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-wbc", "bccd")
    window = viewer.window._qt_window
    window.resize(1280, 800)
    docked = {
        name: viewer.window.add_plugin_dock_widget("napari-wbc", name)[1] for name in WIDGETS
    }
    classify = docked["Classify white cells"]
    classes = [
        "basophil", "eosinophil", "erythroblast", "ig",
        "lymphocyte", "monocyte", "neutrophil", "platelet",
    ]  # fmt: skip
    table = pd.DataFrame(
        {
            "class": [*classes, "total"],
            "count": [1, 2, 0, 3, 10, 4, 20, 0, 40],
            "percent": [2.5, 5.0, 0.0, 7.5, 25.0, 10.0, 50.0, 0.0, 100.0],
            "needs_review": [0] * 9,
        }
    )
    classify.counts.show_counts(table)  # PBC's 8 classes and the total
    for widget in docked.values():  # a two-line status in each
        widget.status.value = (
            "Finding and classifying the white cells (part 3 of 6), 25 cells so far"
        )
    settle(qtbot, 500)
    window.resize(1280, 800)
    settle(qtbot, 500)
    assert window.height() <= 800
    for name, widget in docked.items():
        assert fully_visible(widget.run_button.native), f"{name}: main button hidden"
        assert fully_visible(widget.status.native), f"{name}: status hidden"
    train = docked["Train classifier from annotations"]
    assert train.run_button.text == "Train"
    # Confirming or correcting a cell is one click, in view too.
    for widget in (train.review_button, train.pick, train.set_class_button):
        assert fully_visible(widget.native), widget
    # Teach this lab: its button in view, and while a cell is asked about, its answers too.
    teacher = classify.teacher
    assert fully_visible(teacher.teach_button.native)
    assert fully_visible(teacher.refit_button.native)
    teacher.set_asking(True)
    settle(qtbot, 300)
    window.resize(1280, 800)
    settle(qtbot, 300)
    assert window.height() <= 800
    for widget in (teacher.right_button, teacher.pick, teacher.set_class_button):
        assert fully_visible(widget.native), widget
    assert fully_visible(classify.run_button.native) and fully_visible(classify.status.native)
    counts = classify.counts
    assert fully_visible(counts)
    assert counts.rowCount() == 9
    viewport = counts.viewport().rect()
    for row in range(counts.rowCount()):
        rect = counts.visualItemRect(counts.item(row, 0))
        assert viewport.contains(rect), f"row {row} ({counts.item(row, 0).text()}) cut off"
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.width() >= window.width() / 2
