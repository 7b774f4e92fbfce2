"""Teach this lab in a real viewer: the BCCD sample classified, five cells corrected, refit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_wbc._qt._cells import corrected_count
from napari_wbc._qt.classify import ClassifyWidget

pytestmark = pytest.mark.gui


def _wait(qtbot, w, timeout=600_000):
    qtbot.waitUntil(lambda: not w.busy, timeout=timeout)


def test_five_corrected_cells_teach_the_model_and_count(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    monkeypatch.setenv("NAPARI_WBC_TAUGHT_MODELS", str(tmp_path))
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "bccd")
    _dock, train = viewer.window.add_plugin_dock_widget(
        "napari-wbc", "Train classifier from annotations"
    )
    _dock, w = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify white cells")
    assert isinstance(w, ClassifyWidget)
    w.run()  # the automatic model choice, the built-in models
    _wait(qtbot, w)
    result = viewer.layers[f"{w.image.value.name} cells"]
    teacher = w.teacher
    # Teach and Train default to the Classify result (not the sample's truth layer).
    assert teacher.result_layer().name == result.name
    assert train.layer.value.name == result.name

    teacher.teach_button.clicked()
    assert teacher.asking and teacher.pages.currentWidget() is teacher.answers
    asked = list(teacher.queue)
    assert len(asked) >= 6
    predicted = result.features["class"].astype(str).to_numpy()
    # Every predicted class is asked about, at most five cells each.
    for name in set(predicted):
        assert 1 <= int((predicted[asked] == name).sum()) <= 5
    classes = list(result.metadata["classes"])
    taught: dict[tuple[float, float], str] = {}
    assert teacher.class_names()[: len(classes)] == classes
    for k in range(5):  # five corrections: two by number key, three by the class picker
        index = teacher.current()
        assert result.selected_data == {index}
        new = next(c for c in classes[k:] + classes if c != predicted[index])
        if k < 2:
            number = classes.index(new) + 1
            assert teacher.pick.native.itemText(number - 1) == f"{number} {new}"
            teacher.right_button.native.setFocus()
            qtbot.keyClick(teacher.right_button.native, getattr(Qt.Key, f"Key_{number}"))
        else:
            teacher.pick.value = new
            teacher.set_class_button.clicked()
        assert teacher.current() != index
        taught[tuple(result.data[index])] = new
    index = teacher.current()  # and one confirmed as it is
    teacher.right_button.clicked()
    taught[tuple(result.data[index])] = predicted[index]
    features = result.features
    assert int(features["reviewed"].sum()) == 6
    # The count follows every answer.
    expected = corrected_count(features, classes)
    assert w.counts.rows() == dict(zip(expected["class"], expected["count"], strict=True))
    assert teacher.refit_button.enabled

    teacher.refit_button.clicked()
    _wait(qtbot, w)
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1, w.status.value
    saved = json.loads(files[0].read_text())
    cells = saved["metrics"]["taught"]["cells"]
    assert sum(cells.values()) == 6
    assert cells == {c: list(taught.values()).count(c) for c in set(taught.values())}
    # Offered at once, and the smear was classified again with it.
    assert str(files[0]) in w.model.choices and w.model.value == str(files[0])
    assert "Taught with 6 cells" in w.status.value and files[0].name in w.status.value
    result = viewer.layers[f"{w.image.value.name} cells"]
    features = result.features
    for (y, x), name in taught.items():
        i = int(np.argmin(np.hypot(result.data[:, 0] - y, result.data[:, 1] - x)))
        assert features["class"].iloc[i] == name
        assert bool(features["reviewed"].iloc[i])
    expected = corrected_count(features, classes)
    shown = w.counts.rows()
    assert shown == dict(zip(expected["class"], expected["count"], strict=True))
    # A second teaching never overwrites the first model's files.
    assert teacher.saved == files[0]
