"""Annotations to training crops, and fine-tuning a classifier from them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_wbc.annotations import (
    EXCLUDED,
    annotation_summary,
    cells_from_labels,
    cells_from_points,
    check_trainable,
    iter_finetune,
    iter_write_training_crops,
    review_order,
)
from napari_wbc.errors import DataError, WBCError
from napari_wbc.progress import run

CLASSES = ["lymphocyte", "neutrophil", "monocyte"]


def disc(labels, cy, cx, r, value):
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value


def test_labels_give_one_cell_per_region_with_its_class():
    labels = np.zeros((60, 80), np.int32)
    disc(labels, 10, 10, 4, 1)
    disc(labels, 40, 60, 6, 2)
    disc(labels, 40, 20, 5, 1)
    # Two touching regions of different values are two cells.
    labels[5:10, 40:45] = 3
    labels[5:10, 45:50] = 2
    cells = cells_from_labels(labels, CLASSES).sort_values(["y", "x"]).reset_index(drop=True)
    assert len(cells) == 5
    assert list(cells["label"]) == [
        "monocyte",
        "neutrophil",
        "lymphocyte",
        "lymphocyte",
        "neutrophil",
    ]
    big = cells.iloc[-1]
    assert (big.y, big.x) == pytest.approx((40, 60))
    assert big.diameter == pytest.approx(12, rel=0.1)


def test_label_values_without_a_class_are_named():
    labels = np.zeros((20, 20), np.int32)
    labels[2:5, 2:5] = 2
    labels[10:15, 10:15] = 7
    with pytest.raises(WBCError, match=r"\[7\].*1 = lymphocyte"):
        cells_from_labels(labels, CLASSES)


def test_points_with_a_class_feature_skip_unlabelled_ones():
    points = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    features = pd.DataFrame({"class": ["neutrophil", "", np.nan, "monocyte"]})
    cells = cells_from_points(points, features)
    assert cells[["y", "x"]].to_numpy().tolist() == [[1, 2], [7, 8]]
    assert list(cells["label"]) == ["neutrophil", "monocyte"]
    with pytest.raises(WBCError, match="class"):
        cells_from_points(points, pd.DataFrame({"confidence": [1, 1, 1, 1]}))


def test_classified_points_count_only_when_confirmed_or_corrected():
    points = np.arange(10, dtype=float).reshape(5, 2)
    features = pd.DataFrame(
        {
            "class": ["neutrophil", "monocyte", EXCLUDED, "basophil", "lymphocyte"],
            "confidence": [0.95, 0.4, 0.99, 0.5, 0.92],
            "reviewed": [False, True, True, False, True],
        }
    )
    cells = cells_from_points(points, features)
    assert list(cells["label"]) == ["monocyte", "lymphocyte"]  # excluded never counts
    # The lone uncorrected basophil no longer blocks training.
    check_trainable(pd.concat([cells, cells]), CLASSES)
    cells = cells_from_points(points, features, include_predicted=True, min_confidence=0.9)
    assert list(cells["label"]) == ["neutrophil", "monocyte", "lymphocyte"]


def test_summary_warns_and_too_few_cells_are_refused_by_name():
    cells = pd.DataFrame({"label": ["neutrophil"] * 6 + ["lymphocyte"] * 3 + ["blast"]})
    table, warnings = annotation_summary(cells, CLASSES, min_per_class=5)
    counts = dict(zip(table["class"], table["count"], strict=True))
    assert counts == {"lymphocyte": 3, "neutrophil": 6, "monocyte": 0, "blast": 1}
    assert dict(zip(table["class"], table["ok"], strict=True)) == {
        "lymphocyte": False,
        "neutrophil": True,
        "monocyte": True,
        "blast": False,
    }
    assert len(warnings) == 2 and any("lymphocyte" in w for w in warnings)
    with pytest.raises(DataError, match=r"blast \(1\)"):
        check_trainable(cells)
    with pytest.raises(DataError, match="lacks"):
        check_trainable(cells, CLASSES)
    with pytest.raises(DataError, match="two classes"):
        check_trainable(pd.DataFrame({"label": ["neutrophil"] * 4}))
    check_trainable(cells[cells.label != "blast"], CLASSES)


def test_review_order():
    features = pd.DataFrame(
        {"confidence": [0.9, 0.4, 0.7, 0.4], "disagreement": [0.0, 0.0, 0.5, 0.3]}
    )
    assert review_order(features, "confidence").tolist() == [3, 1, 2, 0]
    assert review_order(features, "disagreement").tolist() == [2, 3, 1, 0]
    with pytest.raises(WBCError):
        review_order(features, "random")


def test_crops_have_the_right_size_and_white_padding(tmp_path):
    image = np.zeros((40, 50, 3), np.uint8)
    image[:, :, 0] = np.arange(50)[None, :]
    cells = pd.DataFrame({"y": [20.0, 2.0], "x": [25.0, 48.0], "label": ["a", "b"]})
    crops = run(iter_write_training_crops(image, cells, tmp_path, 10))
    assert list(crops["label"]) == ["a", "b"]
    inner = np.asarray(Image.open(crops["path"][0]))
    assert inner.shape == (10, 10, 3)
    np.testing.assert_array_equal(inner[0, :, 0], np.arange(20, 30))
    edge = np.asarray(Image.open(crops["path"][1]))
    assert edge.shape == (10, 10, 3)
    assert (edge[:3] == 255).all()  # above the image
    assert (edge[:, 7:] == 255).all()  # right of the image
    assert edge[5, 0, 0] == 43 and edge[5, 0, 1] == 0
    assert crops["path"][1].startswith(str(tmp_path / "b"))
    assert not list(tmp_path.rglob("*.part"))


def smear_with_cells(seed=0):
    """A small RGB image with purple (neutrophil) and pink (lymphocyte, blast) discs."""
    rng = np.random.default_rng(seed)
    image = np.full((160, 200, 3), (238, 228, 222), np.uint8)
    yy, xx = np.mgrid[:160, :200]
    rows = []
    colours = {"neutrophil": (110, 40, 140), "lymphocyte": (220, 120, 160), "blast": (60, 60, 200)}
    for i, (name, colour) in enumerate([*colours.items()] * 3):
        cy, cx = 25 + 50 * (i // 4), 25 + 50 * (i % 4)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = colour
        rows.append((float(cy), float(cx), name))
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return image, pd.DataFrame(rows, columns=["y", "x", "label"])


def tiny_train_config(**kw):
    from napari_wbc.training import TrainConfig

    base = dict(
        spec="tiny-resnet",
        epochs_stage1=1,
        epochs_stage2=1,
        batch_size=4,
        stain_normalize=False,
        num_threads=1,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def test_finetune_keeps_base_weights_and_adds_a_class(tmp_path, tiny_model_path):
    from napari_wbc.models import load_network, read_model_config

    image, cells = smear_with_cells()
    out = tmp_path / "tuned.safetensors"
    events = []
    # lr 0: the saved weights are exactly the initial ones, so we see the initialisation.
    config = tiny_train_config(stages="stage1", lr_stage1=0.0, augment=False)
    classes = [*read_model_config(tiny_model_path).classes, "blast"]
    path = run(
        iter_finetune(image, cells, classes, tiny_model_path, out, config, rbc_diameter_px=10),
        events.append,
    )
    assert path == out and out.is_file()
    assert not list(tmp_path.glob(".*"))  # working folder removed
    assert any(e.info.get("event") == "epoch" for e in events)
    tuned, tuned_config = load_network(out, cache=False)
    base, base_config = load_network(tiny_model_path, cache=False)
    assert tuned_config.classes == (*base_config.classes, "blast")
    assert tuned_config.training["base_model"] == str(tiny_model_path)
    new, old = tuned.state_dict(), base.state_dict()
    fc_keys = [k for k in new if k.startswith("fc.")] or [k for k in new if "head" in k]
    for key, value in new.items():
        if key in fc_keys:
            n = len(base_config.classes)
            np.testing.assert_array_equal(value[:n].numpy(), old[key].numpy())
            assert not np.allclose(value[n:].numpy(), 0)  # fresh, not zeroed
        elif value.ndim >= 2:
            np.testing.assert_array_equal(value.numpy(), old[key].numpy(), err_msg=key)


def test_stage2_alone_keeps_the_base_backbone(tmp_path, tiny_model_path):
    from napari_wbc.models import load_network, read_model_config

    image, cells = smear_with_cells()
    cells = cells[cells.label != "blast"]
    out = tmp_path / "quick.safetensors"
    config = tiny_train_config(stages="stage2", epochs_stage2=2, lr_stage2=0.05)
    classes = list(read_model_config(tiny_model_path).classes)
    run(iter_finetune(image, cells, classes, tiny_model_path, out, config, rbc_diameter_px=10))
    tuned, _ = load_network(out, cache=False)
    base, _ = load_network(tiny_model_path, cache=False)
    changed = [
        k for k, v in tuned.state_dict().items() if not np.array_equal(v, base.state_dict()[k])
    ]
    assert changed and all(k.startswith("fc.") for k in changed)
    with pytest.raises(DataError, match="blast"):
        run(
            iter_finetune(
                image,
                smear_with_cells()[1],
                [*classes, "blast"],
                tiny_model_path,
                tmp_path / "no.safetensors",
                config,
                rbc_diameter_px=10,
            )
        )


def test_cancel_leaves_no_model_file(tmp_path, tiny_model_path):
    image, cells = smear_with_cells()
    out = tmp_path / "cancelled.safetensors"
    config = tiny_train_config(epochs_stage1=3)
    gen = iter_finetune(
        image, cells, [*CLASSES, "blast"], tiny_model_path, out, config, rbc_diameter_px=10
    )
    for event in gen:
        if event.info.get("event") == "epoch":
            break
    gen.close()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_too_few_cells_refused_before_any_work(tmp_path, tiny_model_path):
    image, cells = smear_with_cells()
    cells = pd.concat([cells[cells.label != "blast"], cells[cells.label == "blast"].iloc[:1]])
    with pytest.raises(DataError, match=r"blast \(1\)"):
        run(
            iter_finetune(
                image,
                cells,
                [*CLASSES, "blast"],
                tiny_model_path,
                tmp_path / "m.safetensors",
                tiny_train_config(),
                rbc_diameter_px=10,
            )
        )
    assert list(tmp_path.iterdir()) == []
