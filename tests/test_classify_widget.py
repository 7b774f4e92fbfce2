"""The Classify widget in a real viewer, with a tiny random model."""

import json

import numpy as np
import pandas as pd
import pytest

from napari_wbc._qt._cells import camera, register_session_model
from napari_wbc._qt.classify import MODEL_FILE, SOURCE_POINTS, ClassifyWidget

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(make_napari_viewer, tiny_model_path):
    """The widget as napari's Plugins menu gives it (it sees the viewer through proxies)."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "smear")
    _dock, w = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify white cells")
    assert isinstance(w, ClassifyWidget)
    w.model.value = MODEL_FILE
    w.model_file.value = tiny_model_path
    return w


def click_row(table, name: str) -> None:
    """Click the count table's row of class ``name``, as a user does."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    row = next(r for r in range(table.rowCount()) if table.item(r, 0).text() == name)
    rect = table.visualItemRect(table.item(row, 0))
    QTest.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())


def _wait(qtbot, w, timeout=120_000):
    qtbot.waitUntil(lambda: not w.busy, timeout=timeout)  # run and result shown


def test_classify_sample_gives_points_features_and_counts(widget, qtbot):
    viewer = widget.viewer
    widget.run()
    _wait(qtbot, widget)
    layer = viewer.layers["synthetic smear cells"]
    assert len(layer.data) >= 10
    features = layer.features
    assert {"class", "confidence", "needs_review"} <= set(features.columns)
    p_cols = [c for c in features.columns if c.startswith("p_")]
    assert len(p_cols) == 8
    np.testing.assert_allclose(features[p_cols].sum(axis=1), 1, atol=1e-5)
    # Points sit in the image's world coordinates (the sample has a 0.1 µm scale).
    assert tuple(layer.scale) == tuple(viewer.layers["synthetic smear"].scale)
    table = widget.counts
    rows = {table.item(r, 0).text(): int(table.item(r, 1).text()) for r in range(table.rowCount())}
    assert rows["total"] == len(layer.data)
    assert sum(v for k, v in rows.items() if k != "total") == len(layer.data)
    counts = features["class"].value_counts()
    for name, n in counts.items():
        assert rows[name] == n
    # Re-running replaces the layer instead of adding another.
    n_layers = len(viewer.layers)
    widget.run()
    _wait(qtbot, widget)
    assert len(viewer.layers) == n_layers


def test_selecting_a_cell_centres_the_view(widget, qtbot):
    widget.run()
    _wait(qtbot, widget)
    layer = widget.result_layer
    layer.selected_data = {3}
    expected = layer.data_to_world(layer.data[3])
    np.testing.assert_allclose(camera(widget.viewer).center[-2:], expected[-2:], atol=1e-6)


def test_repeated_clicks_on_a_class_row_step_through_its_cells(widget, qtbot):
    widget.run()
    _wait(qtbot, widget)
    layer = widget.result_layer
    classes = layer.features["class"].to_numpy()
    name = pd.Series(classes).value_counts().index[0]  # the class with most cells
    members = np.flatnonzero(classes == name)
    assert len(members) >= 2
    widget.counts.scrollToTop()
    for k in range(len(members) + 1):
        click_row(widget.counts, name)
        expected = layer.data_to_world(layer.data[members[k % len(members)]])[-2:]
        np.testing.assert_allclose(camera(widget.viewer).center[-2:], expected, atol=1e-6)
    assert f"cell 1/{len(members)}" in widget.status.value  # wrapped around


def test_cancel_leaves_no_partial_layer_nor_counts(widget, qtbot, monkeypatch):
    import functools

    import napari_wbc.pipeline

    # Small blocks, so the live count starts well before the run ends.
    small = functools.partial(napari_wbc.pipeline.ClassifyConfig, block=384)
    monkeypatch.setattr(napari_wbc.pipeline, "ClassifyConfig", small)
    viewer = widget.viewer
    n_layers = len(viewer.layers)
    statuses = []

    def press_cancel_after_counts(event):
        if widget.runner.running and widget.cancel_button.enabled and "cells" in event.info:
            assert widget.counts.rowCount() > 0  # the live count had started
            widget.cancel_button.clicked()
        elif not widget.cancel_button.enabled:
            statuses.append(widget.status.value)

    widget.run_button.clicked()
    widget.runner.worker.yielded.connect(press_cancel_after_counts)
    _wait(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert widget.counts.rowCount() == 0  # no partial counts left behind
    assert "cancelled" in widget.status.value
    assert all("cancelling" in s for s in statuses)  # progress did not overwrite it
    widget.run()  # still usable
    _wait(qtbot, widget)
    assert "synthetic smear cells" in viewer.layers


def test_points_drawn_by_the_user(widget, qtbot):
    viewer = widget.viewer
    image = viewer.layers["synthetic smear"]
    clicks = viewer.add_points(
        np.array([[30.0, 40.0], [80.0, 120.0]]), name="my cells"
    )  # world µm
    widget.source.value = SOURCE_POINTS
    widget.cells_layer.value = clicks
    widget.run()
    _wait(qtbot, widget)
    layer = viewer.layers["synthetic smear cells"]
    np.testing.assert_allclose(image.data_to_world(layer.data[0]), [30.0, 40.0])
    assert len(layer.data) == 2


def test_export_csv_geojson_and_writers(widget, qtbot, tmp_path):
    from napari_wbc._napari import write_points_csv, write_points_geojson

    widget.run()
    _wait(qtbot, widget)
    layer = widget.result_layer
    widget._export("csv", str(tmp_path / "cells.csv"))
    table = pd.read_csv(tmp_path / "cells.csv")
    assert len(table) == len(layer.data)
    np.testing.assert_allclose(table["x_um"], table["x"] * 0.1)
    widget._export("geojson", str(tmp_path / "cells.geojson"))
    geo = json.loads((tmp_path / "cells.geojson").read_text())
    assert len(geo["features"]) == len(layer.data)
    assert geo["features"][0]["properties"]["classification"]["name"] in set(
        layer.features["class"]
    )
    widget._export("crops", str(tmp_path / "crops"))
    assert sum(1 for _ in (tmp_path / "crops").rglob("*.png")) == len(layer.data)
    data, meta, _ = layer.as_layer_data_tuple()
    assert write_points_csv(str(tmp_path / "w.csv"), data, meta)
    assert pd.read_csv(tmp_path / "w.csv")["class"].tolist() == layer.features["class"].tolist()
    assert write_points_geojson(str(tmp_path / "w.geojson"), data, meta)


def test_cells_stay_visible_under_hollow_markers_in_image_units(widget, qtbot):
    import warnings

    viewer = widget.viewer
    image = viewer.layers["synthetic smear"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "Inconsistent units across layers"
        widget.run()
        _wait(qtbot, widget)
        layer = viewer.layers["synthetic smear cells"]
    assert tuple(layer.units) == tuple(image.units)
    assert tuple(layer.scale) == tuple(image.scale)
    np.testing.assert_allclose(np.asarray(layer.face_color)[:, 3], 0)  # hollow
    border = np.asarray(layer.border_color)
    from napari_wbc.export import class_colour

    for i, name in enumerate(layer.features["class"]):
        np.testing.assert_allclose(border[i, :3], np.asarray(class_colour(name)) / 255, atol=1e-3)
    # Cells to review are marked by shape, which no class colour can be mistaken for.
    review = layer.features["needs_review"].to_numpy(bool)
    symbols = np.asarray([str(s) for s in np.atleast_1d(layer.symbol)])
    if len(symbols) == len(review):
        assert len(set(symbols[review]) & set(symbols[~review])) == 0
    # The marker is a ring around the cell, wider than the cell it marks.
    assert float(np.min(layer.size)) > float(np.nanmedian(layer.features["diameter"]))
    assert layer.text.visible
    widget.show_labels.value = False
    assert not viewer.layers["synthetic smear cells"].text.visible


def test_export_path_without_extension_gets_one(widget, qtbot, tmp_path):
    widget.run()
    _wait(qtbot, widget)
    widget._export("csv", str(tmp_path / "cells"))
    widget._export("geojson", str(tmp_path / "cells"))
    assert (tmp_path / "cells.csv").is_file() and (tmp_path / "cells.geojson").is_file()
    geo = json.loads((tmp_path / "cells.geojson").read_text())
    height, width = widget.viewer.layers["synthetic smear"].data.shape[:2]
    for feature in geo["features"]:
        if feature["geometry"]["type"] == "Polygon":
            ring = np.asarray(feature["geometry"]["coordinates"][0])
            assert ring.min() >= 0 and ring[:, 0].max() <= width and ring[:, 1].max() <= height


def test_trained_models_are_offered_at_once(widget, tiny_model_path):
    register_session_model(tiny_model_path)
    assert str(tiny_model_path) in widget.model.choices


def test_a_smear_unlike_the_training_data_is_called_out(widget, qtbot, tiny_model_path):
    from napari_wbc.models.files import load_network, save_ensemble
    from napari_wbc.trust import FeatureStats, TrustStats

    model, config = load_network(tiny_model_path)
    width = model.num_features
    # Statistics under which every cell is far from the training cells.
    stats = TrustStats(
        ood_threshold=1e-9,
        features=[FeatureStats(np.zeros((len(config.classes), width)), np.ones(width))],
    )
    strict = tiny_model_path.parent / "strict-trust.json"
    save_ensemble(strict, [tiny_model_path], tta="none", trust=stats.to_dict())
    widget.model_file.value = strict
    widget.run()
    _wait(qtbot, widget)
    layer = widget.viewer.layers["synthetic smear cells"]
    assert layer.features["out_of_distribution"].all()
    assert layer.features["needs_review"].all()
    assert "unlike the model's training data" in widget.status.value


def test_adaptation_switch_reaches_the_run_and_its_outcome_is_shown(widget, qtbot):
    # Automatic by default: only images the automatic choice gives the
    # three-lab model (here a model file is chosen: never by default).
    assert widget.adapt.value == "auto"
    widget.run()
    _wait(qtbot, widget)
    assert "adapt" not in widget.status.value
    widget.adapt.value = "on"
    widget.run()
    _wait(qtbot, widget)
    layer = widget.viewer.layers["synthetic smear cells"]
    # The sample smear holds fewer white cells than adaptation needs: it is
    # classified as it is, and the widget says why.
    assert len(layer.data) < 32
    assert "not adapted" in widget.status.value


def test_the_pbc_specialist_is_offered(widget):
    from napari_wbc._qt.classify import MODEL_PBC

    assert MODEL_PBC in widget.model.choices
    widget.model.value = MODEL_PBC
    assert widget._model_path().endswith("wbc-pbc.json")


def test_the_automatic_choice_is_the_default_and_says_which_model_it_took(
    make_napari_viewer, qtbot
):
    from napari_wbc._qt.classify import MODEL_AUTO

    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "smear")
    _dock, w = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify white cells")
    assert w.model.value == MODEL_AUTO == w.model.choices[0]
    assert w._model_path() == "auto"
    w.run()
    _wait(qtbot, w, timeout=240_000)
    # The sample is painted from PBC cells: the specialist classifies it.
    assert "Model chosen: the PBC specialist (wbc-pbc)" in w.status.value
    assert w.result_layer.metadata["model"] == "wbc-pbc"


def test_a_new_result_layer_is_shown_step_by_step_as_the_labels_switch_says(widget, qtbot):
    # Added hidden, then shown, then its text (issue #17: each first draw on
    # a turn of its own); the labels follow the switch as it is when shown.
    widget.show_labels.value = False
    widget.run()
    _wait(qtbot, widget)
    layer = widget.result_layer
    assert layer.visible
    assert not layer.text.visible
    widget.show_labels.value = True
    assert layer.text.visible


def test_a_5_part_panel_gives_five_classes_in_the_layer_and_the_count(widget, qtbot):
    from napari_wbc.panels import FIVE_PART

    assert widget.classes.value == "all"  # every class by default
    widget.classes.value = "5-part"
    widget.run()
    _wait(qtbot, widget)
    features = widget.viewer.layers["synthetic smear cells"].features
    assert sorted(c[2:] for c in features.columns if c.startswith("p_")) == list(FIVE_PART)
    assert set(features["class"]) <= set(FIVE_PART)
    table = widget.counts
    rows = {table.item(r, 0).text() for r in range(table.rowCount())}
    assert rows - {"total"} <= set(FIVE_PART)


#: Words of the core's stage names and messages a hematologist does not read
#: (issue #33: "route: 25 cells to choose the model by", "doubtful: classified
#: 4/4 crops in doubt (model 3/3, views 2-4)").
JARGON = (
    "route",
    "doubtful",
    "crops in doubt",
    "views ",
    "blocks:",
    "model 1/",
    "choose the model by",
)


def _ours(warning) -> bool:
    """Whether a recorded warning comes from napari-wbc (or from napari, about our code)."""
    text = str(warning.message)
    return (
        "napari_wbc" in str(warning.filename)
        or "Private attribute access" in text  # napari: a plugin used its private API
        or "Applying the encoding failed" in text  # a layer style our code set
    )


def test_a_normal_classify_run_is_quiet_and_in_plain_words(
    make_napari_viewer, qtbot, tiny_model_path
):
    """No warning nor warning toast from our code, from opening the dock to the count."""
    import warnings

    from napari.utils.notifications import NotificationSeverity, notification_manager

    from napari_wbc._qt._common import models_loaded

    toasts = []
    notification_manager.notification_ready.connect(toasts.append)
    viewer = make_napari_viewer(show=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viewer.open_sample("napari-wbc", "gallery")
        _dock, w = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify white cells")
        qtbot.waitUntil(models_loaded, timeout=120_000)
        qtbot.wait(300)  # anything the dock schedules once torch has loaded
        w.model.value = MODEL_FILE
        w.model_file.value = tiny_model_path
        statuses = []
        w.run()
        # After the runner's own handler: the status as the event left it.
        w.runner.worker.yielded.connect(lambda _e: statuses.append(w.status.value))
        _wait(qtbot, w)
        statuses.append(w.status.value)
    notification_manager.notification_ready.disconnect(toasts.append)
    assert len(w.result_layer.data) > 0, w.status.value
    ours = [f"{x.category.__name__}: {x.message} ({x.filename})" for x in caught if _ours(x)]
    assert ours == []
    loud = [n.message for n in toasts if n.severity >= NotificationSeverity.WARNING]
    assert loud == []
    assert len(statuses) >= 3
    for text in statuses:
        assert not any(word in text for word in JARGON), text


def test_plain_words_for_the_core_progress_messages():
    from napari_wbc._qt._common import plain_status
    from napari_wbc.progress import Progress

    assert (
        plain_status(Progress("route", 2, 6, "25 cells to choose the model by"))
        == "Choosing the model: looking at 25 cells"
    )
    doubtful = plain_status(
        Progress("doubtful", 8, 12, "classified 4/4 crops in doubt (model 3/3, views 2-4)")
    )
    assert doubtful == "Checking 4 uncertain cells more closely (66%)"
    verdict = plain_status(
        Progress(
            "route",
            1,
            1,
            "wbc-pbc: 4% of 25 cells look unlike the PBC specialist's training cells "
            "(it is used when at most 30% do)",
        )
    )
    assert verdict.startswith("Model chosen: the PBC specialist (wbc-pbc). 4% of 25 cells")
    assert "≤" not in verdict
    scale = plain_status(
        Progress("scale", 1, 1, "red cell ≈ 108 px (estimated from 69 red cells); crops 516 px")
    )
    assert scale == "Red cells measured: about 108 px across (estimated from 69 red cells)"
    # A stage with no words of its own is shown as it comes.
    assert plain_status(Progress("newstage", 0, 1, "working")) == "newstage: working"


def test_corrections_count_in_the_table_and_train_defaults_to_the_result(
    make_napari_viewer, qtbot, tiny_model_path
):
    """Issue #33: Train picks the Classify result; a correction changes the count at once."""
    from napari_wbc._qt.train import SOURCE_POINTS, TrainWidget
    from napari_wbc.annotations import EXCLUDED

    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "gallery")  # its truth is a Points layer too
    _dock, train = viewer.window.add_plugin_dock_widget(
        "napari-wbc", "Train classifier from annotations"
    )
    assert isinstance(train, TrainWidget) and train.source.value == SOURCE_POINTS
    _dock, w = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify white cells")
    w.model.value = MODEL_FILE
    w.model_file.value = tiny_model_path
    w.run()
    _wait(qtbot, w)
    result = viewer.layers[f"{w.image.value.name} cells"]
    assert train.layer.value.name == result.name  # not the truth layer above it
    # A dock opened after the run picks the result too.
    _dock, later = viewer.window.add_plugin_dock_widget(
        "napari-wbc", "Train classifier from annotations"
    )
    assert later.layer.value.name == result.name

    def counts():
        return w.counts.rows()

    before = counts()
    classes = result.features["class"].astype(str).to_numpy()
    first = classes[0]
    new = next(c for c in train.pick.choices if c not in (first, EXCLUDED))
    # The user picks the truth layer by mistake, then selects a cell in the result.
    truth = next(layer for layer in viewer.layers if layer.name.endswith("truth"))
    train.layer.value = truth
    viewer.layers.selection.active = result
    result.selected_data = {0}
    train.pick.value = new
    train.set_class_button.clicked()
    assert result.features["class"].iloc[0] == new
    assert bool(result.features["reviewed"].iloc[0])
    assert train.layer.value.name == result.name  # the corrections are what it trains on
    after = counts()
    assert after[new] == before.get(new, 0) + 1
    assert after[first] == before[first] - 1
    assert after["total"] == before["total"]
    # Excluded (not a white cell): out of the count.
    result.selected_data = {1}
    train.pick.value = EXCLUDED
    train.set_class_button.clicked()
    assert counts()["total"] == before["total"] - 1
    # Only the two cells the user saw count as training labels.
    table = train.update_counts()
    assert int(table["count"].sum()) == 1  # the excluded one is no label
