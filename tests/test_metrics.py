"""Classification metrics against hand-computed values, and the confusion PNG."""

import json

import numpy as np
import pytest
from PIL import Image

from napari_wbc.errors import DataError
from napari_wbc.metrics import classification_metrics, save_confusion_png

CLASSES = ["a", "b", "c"]
TRUE = ["a", "a", "a", "b", "b", "c"]
PRED = ["a", "a", "b", "b", "c", "c"]


def test_metrics_match_hand_computation():
    m = classification_metrics(TRUE, PRED, CLASSES)

    # a: TP 2 of 3 true, 2 predicted; b: TP 1 of 2 true, 2 predicted;
    # c: TP 1 of 1 true, 2 predicted.
    p = {"a": 2 / 2, "b": 1 / 2, "c": 1 / 2}
    r = {"a": 2 / 3, "b": 1 / 2, "c": 1 / 1}
    f1 = {k: 2 * p[k] * r[k] / (p[k] + r[k]) for k in p}
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    for k in CLASSES:
        assert m["per_class"][k]["precision"] == pytest.approx(p[k])
        assert m["per_class"][k]["recall"] == pytest.approx(r[k])
        assert m["per_class"][k]["f1"] == pytest.approx(f1[k])
    assert [m["per_class"][k]["support"] for k in CLASSES] == [3, 2, 1]
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["classes"] == CLASSES
    assert m["confusion_columns"] == CLASSES
    assert m["absent_classes"] == []


def test_integer_labels_index_classes_and_result_is_json():
    index = {c: i for i, c in enumerate(CLASSES)}
    by_index = classification_metrics(
        np.array([index[t] for t in TRUE]), [index[q] for q in PRED], CLASSES
    )
    assert by_index == classification_metrics(TRUE, PRED, CLASSES)
    assert json.loads(json.dumps(by_index)) == by_index


def test_subset_of_classes_averages_over_present_classes_only():
    classes = ["a", "b", "c", "d"]
    true = ["a", "a", "b", "b"]
    pred = ["a", "c", "b", "b"]
    m = classification_metrics(true, pred, classes)

    assert m["classes"] == ["a", "b"]
    assert m["absent_classes"] == ["c", "d"]
    assert m["confusion_columns"] == ["a", "b", "c"]
    assert m["confusion"] == [[1, 0, 1], [0, 2, 0]]
    # a: P 1/1, R 1/2, F1 2/3; b: P 2/2, R 1, F1 1. "c" counts only as an error.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert set(m["per_class"]) == {"a", "b"}


def test_never_predicted_class_has_zero_precision_and_f1():
    m = classification_metrics(["a", "b"], ["a", "a"], ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)


def test_unknown_predicted_name_is_an_error_column():
    m = classification_metrics(["a", "b"], ["a", "uncertain"], ["a", "b"])
    assert m["confusion_columns"] == ["a", "b", "uncertain"]
    assert m["confusion"] == [[1, 0, 0], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.5)


def test_perfect_predictions_score_one():
    m = classification_metrics(TRUE, TRUE, CLASSES)
    assert m["accuracy"] == m["macro_f1"] == m["balanced_accuracy"] == 1.0
    assert np.array_equal(np.diag(m["confusion"]), [3, 2, 1])


@pytest.mark.parametrize(
    ("true", "pred", "match"),
    [([], [], "no samples"), (["a"], ["a", "b"], "lengths|has 1"), (["z"], ["a"], "not among")],
)
def test_bad_inputs_raise(true, pred, match):
    with pytest.raises(DataError, match=match):
        classification_metrics(true, pred, CLASSES)
    with pytest.raises(DataError, match="index 5"):
        classification_metrics([0], [5], CLASSES)


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_png_is_a_valid_image(tmp_path, normalize):
    m = classification_metrics(["a", "a", "b"], ["a", "c", "b"], ["a", "b", "c"])
    out = save_confusion_png(m, tmp_path / "sub" / "confusion.png", normalize=normalize)

    assert out == tmp_path / "sub" / "confusion.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.width > 100 and im.height > 100
        # Not a blank canvas: the matrix cells are coloured.
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]  # no temp left
