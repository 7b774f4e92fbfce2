"""The Train widget in a real viewer: annotate the sample smear, fine-tune a tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wbc._qt._cells import camera
from napari_wbc._qt.classify import ClassifyWidget
from napari_wbc._qt.train import (
    BASE_FILE,
    SOURCE_CROPS,
    SOURCE_LABELS,
    SOURCE_POINTS,
    TrainWidget,
)
from napari_wbc.annotations import EXCLUDED
from napari_wbc.models import read_model_config
from napari_wbc.synthetic import sample_smear_truth

pytestmark = pytest.mark.gui


def tiny_config(**kw):
    from napari_wbc.training import TrainConfig

    base = dict(epochs_stage1=1, epochs_stage2=1, batch_size=8, num_threads=1, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def setup(make_napari_viewer, tiny_model_path, tmp_path):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "smear")
    # As napari's Plugins menu gives it: the widget sees layers through proxies.
    _dock, w = viewer.window.add_plugin_dock_widget(
        "napari-wbc", "Train classifier from annotations"
    )
    assert isinstance(w, TrainWidget)
    w.base.value = BASE_FILE
    w.base_file.value = tiny_model_path
    w.output.value = tmp_path / "tuned.safetensors"
    truth = sample_smear_truth()
    return viewer, w, truth[truth.kind == "wbc"].reset_index(drop=True)


def _wait(qtbot, w, timeout=180_000):
    qtbot.waitUntil(lambda: not w.runner.running, timeout=timeout)


def test_labels_annotations_train_a_model_that_classifies(setup, qtbot, tiny_model_path, tmp_path):
    viewer, w, wbc = setup
    image = viewer.layers["synthetic smear"]
    classes = w._class_list()
    assert classes == list(read_model_config(tiny_model_path).classes)
    labels = np.zeros(image.data.shape[:2], np.int32)
    yy, xx = np.ogrid[: labels.shape[0], : labels.shape[1]]
    picked = wbc[wbc.label.isin(["neutrophil", "lymphocyte"])]
    for row in picked.itertuples():
        r = row.diameter / 2
        labels[(yy - row.y) ** 2 + (xx - row.x) ** 2 <= r * r] = classes.index(row.label) + 1
    viewer.add_labels(labels, name="annotations", scale=image.scale)
    w.source.value = SOURCE_LABELS
    w.layer.value = viewer.layers["annotations"]
    table = w.update_counts()
    counts = dict(zip(table["class"], table["count"], strict=True))
    assert counts["neutrophil"] == (picked.label == "neutrophil").sum()
    assert counts["lymphocyte"] == (picked.label == "lymphocyte").sum()
    assert "too few" in w.counts.value and "lymphocyte" in w.counts.value  # 3 < 5

    bar = []
    w.progress.changed.connect(lambda _v: bar.append(w.progress.value / w.progress.max))
    w.run(tiny_config())
    _wait(qtbot, w)
    out = tmp_path / "tuned.safetensors"
    assert out.is_file(), w.status.value
    assert w.model_path == out
    during = bar[: bar.index(1.0) + 1] if 1.0 in bar else bar
    assert during == sorted(during), during  # one bar over both stages
    saved = read_model_config(out).metrics["macro_f1"]
    assert f"macro-F1 of {saved:.2f}" in w.status.value
    assert len(w.plot.epochs) == 2  # one epoch per stage, plotted live
    assert w.plot.caption() == "epoch (stage 1, then stage 2)"
    assert 0 <= w.plot.epochs[-1]["val_macro_f1"] <= 1
    assert not list(tmp_path.glob(".*"))  # no working folder left

    classify = ClassifyWidget(viewer)
    assert str(out) in classify.model.choices
    classify.model.value = str(out)
    classify.run()
    qtbot.waitUntil(lambda: not classify.runner.running, timeout=180_000)
    cells = viewer.layers["synthetic smear cells"]
    assert len(cells.data) >= 10
    assert cells.features["class"].isin(classes).all()


def test_points_class_picker_and_a_new_class(setup, qtbot, tmp_path):
    viewer, w, wbc = setup
    image = viewer.layers["synthetic smear"]
    world = np.array([image.data_to_world((r.y, r.x)) for r in wbc.itertuples()])
    points = viewer.add_points(world, name="clicks")
    w.source.value = SOURCE_POINTS
    w.layer.value = points
    w.add_class("blast")
    assert w._class_list()[-1] == "blast" and "blast" in w.pick.choices
    # Label every cell with its true class, then call two neutrophils "blast".
    for name in ("neutrophil", "lymphocyte", "monocyte"):
        points.selected_data = set(np.flatnonzero(wbc.label == name).tolist())
        w.set_class(name)
    renamed = np.flatnonzero(wbc.label == "neutrophil")[:2]
    points.selected_data = set(renamed.tolist())
    w.pick.value = "blast"
    w.set_class_button.clicked()
    assert list(points.features["class"].iloc[renamed]) == ["blast", "blast"]
    unlabelled = ~wbc.label.isin(["neutrophil", "lymphocyte", "monocyte"]).to_numpy()
    assert (points.features["class"].to_numpy()[unlabelled] == "").all()
    table = w.update_counts()
    assert dict(zip(table["class"], table["count"], strict=True))["blast"] == 2

    w.run(tiny_config())
    _wait(qtbot, w)
    out = tmp_path / "tuned.safetensors"
    assert out.is_file(), w.status.value
    assert read_model_config(out).classes[-1] == "blast"


def test_too_few_cells_is_a_message_not_a_crash(setup, tmp_path):
    viewer, w, wbc = setup
    image = viewer.layers["synthetic smear"]
    first = wbc.iloc[:3]
    points = viewer.add_points(
        np.array([image.data_to_world((r.y, r.x)) for r in first.itertuples()]),
        features=pd.DataFrame({"class": ["neutrophil", "neutrophil", "monocyte"]}),
    )
    w.source.value = SOURCE_POINTS
    w.layer.value = points
    assert w.run(tiny_config()) is None
    assert "monocyte (1)" in w.status.value
    assert not w.runner.running


def test_cancel_leaves_no_model_and_the_viewer_usable(setup, qtbot, tmp_path):
    viewer, w, wbc = setup
    image = viewer.layers["synthetic smear"]
    keep = wbc[wbc.label.isin(["neutrophil", "lymphocyte"])]
    points = viewer.add_points(
        np.array([image.data_to_world((r.y, r.x)) for r in keep.itertuples()]),
        features=pd.DataFrame({"class": keep.label.to_numpy()}),
    )
    w.source.value = SOURCE_POINTS
    w.layer.value = points
    n_layers = len(viewer.layers)
    worker = w.run(tiny_config(epochs_stage1=50))
    worker.yielded.connect(lambda e: w.cancel() if e.stage == "stage1" else None)
    _wait(qtbot, w)
    out = tmp_path / "tuned.safetensors"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # working folder and checkpoint removed
    assert "cancel" in w.status.value
    assert len(viewer.layers) == n_layers
    assert w.run_button.enabled and not w.cancel_button.enabled
    w.run(tiny_config(stages="stage2"))  # still usable: a quick stage-2 run
    _wait(qtbot, w)
    assert out.is_file(), w.status.value


def classified_points(viewer, n_reviewed: int = 0):
    """A layer like the Classify output: four cells, classes, confidences."""
    features = pd.DataFrame(
        {
            "class": ["neutrophil", "lymphocyte", "monocyte", "neutrophil"],
            "confidence": [0.9, 0.3, 0.6, 0.5],
            "disagreement": [0.0, 0.0, 0.7, 0.0],
            "needs_review": [False, True, False, True],
            "reviewed": [True] * n_reviewed + [False] * (4 - n_reviewed),
        }
    )
    data = np.array([[100.0, 100.0], [200.0, 300.0], [400.0, 500.0], [600.0, 700.0]])
    return viewer.add_points(
        data, features=features, scale=(0.1, 0.1), metadata={"napari_wbc_cells": True}
    )


def test_next_cell_to_review_advances_through_the_button(setup):
    viewer, w, _ = setup
    layer = classified_points(viewer)
    seen = []
    for k in range(1, 6):
        w.review_button.clicked()
        seen.append(next(iter(viewer.layers[layer.name].selected_data)))
        assert f"cell {k}/4" in w.status.value
    assert seen == [1, 3, 2, 0, 1]  # least confident first, then wraps around


def test_only_confirmed_or_corrected_cells_train_by_default(setup):
    viewer, w, _ = setup
    layer = classified_points(viewer)
    w.source.value = SOURCE_POINTS
    w.layer.value = viewer.layers[layer.name]
    table = w.update_counts()
    assert table["count"].sum() == 0  # predictions alone are not labels
    assert "confirm or correct" in w.counts.value
    # Review: the first cell shown is confirmed, the next corrected, the next excluded.
    w.review_button.clicked()  # cell 1 (lymphocyte)
    w.set_class_button.clicked()  # confirms the class the picker was set to
    w.review_button.clicked()  # cell 3 (neutrophil) is a monocyte
    w.pick.value = "monocyte"
    w.set_class_button.clicked()
    w.review_button.clicked()  # cell 2: not a white cell
    assert EXCLUDED in w.pick.choices
    w.pick.value = EXCLUDED
    w.set_class_button.clicked()
    features = viewer.layers[layer.name].features
    assert features["reviewed"].tolist() == [False, True, True, True]
    assert features["class"].tolist() == ["neutrophil", "lymphocyte", EXCLUDED, "monocyte"]
    counts = w.update_counts().set_index("class")["count"]
    assert counts[counts > 0].to_dict() == {"lymphocyte": 1, "monocyte": 1}
    # Optionally, confident predictions count too (cell 0, confidence 0.9).
    w.include_predicted.value = True
    w.min_confidence.value = 0.85
    counts = w.update_counts().set_index("class")["count"]
    assert counts[counts > 0].to_dict() == {"lymphocyte": 1, "monocyte": 1, "neutrophil": 1}


def test_review_steps_from_least_confident(setup):
    viewer, w, _ = setup
    features = pd.DataFrame(
        {
            "class": ["neutrophil", "lymphocyte", "monocyte", "neutrophil"],
            "confidence": [0.9, 0.3, 0.6, 0.5],
            "disagreement": [0.0, 0.0, 0.7, 0.0],
        }
    )
    data = np.array([[100.0, 100.0], [200.0, 300.0], [400.0, 500.0], [600.0, 700.0]])
    layer = viewer.add_points(
        data, features=features, scale=(0.1, 0.1), metadata={"napari_wbc_cells": True}
    )
    assert w.review_next() == 1
    assert layer.selected_data == {1}
    np.testing.assert_allclose(camera(viewer).center[-2:], [20.0, 30.0])
    assert w.pick.value == "lymphocyte"
    assert w.review_next() == 3
    w.review_by.value = "disagreement"
    assert w.review_next() == 2


def test_crops_folder_stage2_only(setup, qtbot, tmp_path):
    from napari_wbc.annotations import iter_write_training_crops
    from napari_wbc.progress import run

    viewer, w, wbc = setup
    image = viewer.layers["synthetic smear"]
    cells = wbc[wbc.label.isin(["neutrophil", "lymphocyte"])].copy()
    run(iter_write_training_crops(image.data, cells, tmp_path / "crops", 48))
    w.source.value = SOURCE_CROPS
    w.crops.value = tmp_path / "crops"
    w.stages.value = "stage2"
    w.epochs2.value = 1
    w.run()
    _wait(qtbot, w)
    out = tmp_path / "tuned.safetensors"
    assert out.is_file(), w.status.value
    assert read_model_config(out).training["stages"] == "stage2"
    assert [e["stage"] for e in w.plot.epochs] == [2]
    assert w.plot.caption() == "epoch (stage 2)"  # not "stage 1, then stage 2"


def trainer_events(epochs1=2, epochs2=2, batches=3):
    """Progress events shaped as the trainer yields them (both stages)."""
    from napari_wbc.progress import Progress

    events = [Progress("scale", 1, 1, "red cell ≈ 50 px"), Progress("crops", 5, 10, "")]
    for stage, epochs in (("stage1", epochs1), ("stage2", epochs2)):
        if stage == "stage2":
            events.append(Progress("stage2", 1, 2, "extracting features (train)"))
        for epoch in range(epochs):
            for b in range(1, batches + 1):
                done = epoch * batches + b
                info = {"epoch": epoch + 1, "batch": b, "loss": 1.0}
                events.append(Progress(stage, done, epochs * batches, "", info))
            events.append(Progress(stage, 0, 0, "validating 1/2"))
            info = {"event": "epoch", "epoch": epoch + 1, "val_macro_f1": 0.5, "loss": 1.0}
            events.append(Progress(stage, (epoch + 1) * batches, 0, "", info))
    events.append(Progress("done", 1, 1, "saved"))
    return events


def test_one_progress_bar_over_both_stages_never_goes_back():
    from napari_wbc._qt.train import training_bar

    bar = training_bar(tiny_config(epochs_stage1=2, epochs_stage2=2))
    shown = [bar(e) for e in trainer_events()]
    values = [done / total for done, total in (s for s in shown if s is not None)]
    assert values == sorted(values)  # never drops (to 0 at each epoch, as it did)
    assert values[-1] == 1.0
    # Halfway through all the epochs once stage 1's are done.
    events = trainer_events()
    last_stage1 = max(i for i, e in enumerate(events) if e.stage == "stage1" and e.total)
    done, total = bar(events[last_stage1])
    assert done / total == 0.5


def test_the_status_gives_the_saved_models_score_not_the_last_rounds(setup, monkeypatch, tmp_path):
    import napari_wbc.models.files as files

    _viewer, w, _ = setup
    from types import SimpleNamespace

    # The best round's model, the one saved, scored 0.67; the last round 0.50.
    saved = SimpleNamespace(metrics={"macro_f1": 0.67})
    monkeypatch.setattr(files, "read_model_config", lambda _path: saved)
    w.plot.add({"stage": 1, "loss": 1.0, "val_macro_f1": 0.67, "best_val_macro_f1": 0.67})
    w.plot.add({"stage": 2, "loss": 0.8, "val_macro_f1": 0.50, "best_val_macro_f1": 0.67})
    w._done(tmp_path / "tuned.safetensors")
    assert "0.67" in w.status.value and "0.50" not in w.status.value
    assert "Classify" in w.status.value


def test_set_class_gives_a_class_by_default_never_exclude(setup):
    _viewer, w, _ = setup
    assert w.pick.value == w._class_list()[0]
    assert w.pick.value != EXCLUDED
