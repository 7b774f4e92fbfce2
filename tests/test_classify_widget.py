"""The Classify widget in a real viewer, with a tiny random model."""

import json

import numpy as np
import pandas as pd
import pytest

from napari_wbc._qt.classify import (
    MODEL_FILE,
    SOURCE_POINTS,
    ClassifyWidget,
    camera,
    register_session_model,
)

pytestmark = pytest.mark.gui


@pytest.fixture
def widget(make_napari_viewer, tiny_model_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "smear")
    w = ClassifyWidget(viewer)
    w.model.value = MODEL_FILE
    w.model_file.value = tiny_model_path
    return w


def _wait(qtbot, w, timeout=120_000):
    qtbot.waitUntil(lambda: not w.runner.running, timeout=timeout)


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
    # A class row steps through that class's cells.
    name = layer.features["class"].iloc[0]
    row = next(r for r in range(widget.counts.rowCount()) if widget.counts.item(r, 0).text() == name)
    widget.counts.selectRow(row)
    first = np.flatnonzero(layer.features["class"].to_numpy() == name)[0]
    np.testing.assert_allclose(camera(widget.viewer).center[-2:], layer.data_to_world(layer.data[first])[-2:])


def test_cancel_leaves_no_partial_layer(widget, qtbot):
    viewer = widget.viewer
    n_layers = len(viewer.layers)
    widget.run()
    widget.runner.worker.yielded.connect(lambda _e: widget.cancel())
    _wait(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert "cancel" in widget.status.value
    widget.run()  # still usable
    _wait(qtbot, widget)
    assert "synthetic smear cells" in viewer.layers


def test_points_drawn_by_the_user(widget, qtbot):
    viewer = widget.viewer
    image = viewer.layers["synthetic smear"]
    clicks = viewer.add_points(np.array([[30.0, 40.0], [80.0, 120.0]]), name="my cells")  # world µm
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
    assert geo["features"][0]["properties"]["classification"]["name"] in set(layer.features["class"])
    widget._export("crops", str(tmp_path / "crops"))
    assert sum(1 for _ in (tmp_path / "crops").rglob("*.png")) == len(layer.data)
    data, meta, _ = layer.as_layer_data_tuple()
    assert write_points_csv(str(tmp_path / "w.csv"), data, meta)
    assert pd.read_csv(tmp_path / "w.csv")["class"].tolist() == layer.features["class"].tolist()
    assert write_points_geojson(str(tmp_path / "w.geojson"), data, meta)


def test_trained_models_are_offered_at_once(widget, tiny_model_path):
    register_session_model(tiny_model_path)
    assert str(tiny_model_path) in widget.model.choices
