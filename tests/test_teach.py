"""Teaching a model a lab from a few cells: the refit classifier, its provenance, the cells chosen."""

import json

import numpy as np
import pytest
import torch

from napari_wbc.inference import load_any, predict_crops
from napari_wbc.teach import (
    TeachConfig,
    TeachError,
    choose_cells_to_teach,
    d4_views,
    save_taught,
    teach,
)
from napari_wbc.trust import FeatureStats, TrustStats


def _cells(n_per_class, classes, seed=0, size=32):
    """Crops whose class is their colour: a task any backbone separates."""
    rng = np.random.default_rng(seed)
    colours = {c: rng.integers(30, 225, size=3) for c in classes}
    crops, labels = [], []
    for c in classes:
        for _ in range(n_per_class):
            base = colours[c] + rng.normal(0, 6, size=(size, size, 3))
            crops.append(np.clip(base, 0, 255).astype(np.uint8))
            labels.append(c)
    return np.stack(crops), labels


def test_taught_cells_are_classified_as_taught_and_the_backbone_is_kept(tiny_model_path):
    ensemble = load_any(tiny_model_path, tta="none")
    taught_classes = ["eosinophil", "lymphocyte", "neutrophil"]
    crops, labels = _cells(5, taught_classes)
    test_crops, test_labels = _cells(20, taught_classes, seed=0)
    before = predict_crops(ensemble, test_crops)["probs"].argmax(1)
    classes = list(ensemble.classes)
    acc_before = np.mean([classes[k] == t for k, t in zip(before, test_labels, strict=True)])

    taught = teach(ensemble, crops, labels, config=TeachConfig(steps=150, replay_share=0))
    after = predict_crops(taught, test_crops)["probs"].argmax(1)
    acc_after = np.mean([classes[k] == t for k, t in zip(after, test_labels, strict=True)])
    assert acc_after >= 0.9 > acc_before

    old, new = ensemble.members[0].model, taught.members[0].model
    head = new.default_cfg["classifier"] + "."
    for name, tensor in old.state_dict().items():
        if not name.startswith(head):
            assert torch.equal(tensor, new.state_dict()[name]), f"backbone tensor {name} changed"
    assert not torch.equal(old.get_classifier().weight, new.get_classifier().weight)
    assert taught.metrics["taught"]["cells"] == {c: 5 for c in taught_classes}


def test_replay_keeps_the_classes_nobody_taught(tiny_model_path):
    """Taught only neutrophils, a model with replay still calls the training labs' other cells."""
    ensemble = load_any(tiny_model_path, tta="none")
    classes = list(ensemble.classes)
    crops, labels = _cells(30, classes, seed=1)
    from napari_wbc.features import member_outputs

    feats = member_outputs(ensemble, crops)["features"][0]
    y = np.array([classes.index(v) for v in labels])
    stats = FeatureStats.fit(feats, y, len(classes))
    # a head that knows every class first: teach all of them with replay off
    base = teach(ensemble, crops, labels, config=TeachConfig(steps=200, replay_share=0))
    few, few_labels = crops[y == classes.index("neutrophil")][:3], ["neutrophil"] * 3

    def share_right(model):
        pred = predict_crops(model, crops)["probs"].argmax(1)
        return float(np.mean(pred == y))

    cfg = dict(steps=200, seed=0)
    forgot = teach(base, few, few_labels, config=TeachConfig(replay_share=0, **cfg))
    kept = teach(
        base, few, few_labels, config=TeachConfig(replay_share=0.5, **cfg), replay=[stats]
    )
    assert share_right(kept) > share_right(forgot) + 0.3
    assert share_right(kept) >= 0.8


def test_taught_model_is_saved_with_provenance_and_never_overwrites(tiny_model_path, tmp_path):
    ensemble = load_any(tiny_model_path, tta="d4")
    ensemble.trust = TrustStats(temperature=1.5)
    crops, labels = _cells(2, ["basophil", "monocyte"])
    taught = teach(ensemble, crops, labels, config=TeachConfig(steps=5), source="lab A")
    path = save_taught(tmp_path / "my-lab.json", taught)
    assert path.suffix == ".json"
    again = load_any(path)
    assert again.tta == "d4" and again.trust.temperature == pytest.approx(1.5)
    recorded = json.loads(path.read_text())["metrics"]["taught"]
    assert recorded["cells"] == {"basophil": 2, "monocyte": 2}
    assert recorded["source"] == "lab A" and recorded["date"]
    np.testing.assert_allclose(
        predict_crops(again, crops)["probs"], predict_crops(taught, crops)["probs"], atol=1e-5
    )
    with pytest.raises(TeachError, match="exists"):
        save_taught(path, taught)


def test_bad_teaching_input_says_what_to_do(tiny_model_path):
    ensemble = load_any(tiny_model_path, tta="none")
    crops, _ = _cells(1, ["a"])
    with pytest.raises(TeachError, match="knows no class 'blast'"):
        teach(ensemble, crops, ["blast"])
    with pytest.raises(TeachError, match="no taught cells"):
        teach(ensemble, crops[:0], [])
    with pytest.raises(TeachError, match="one label per crop"):
        teach(ensemble, crops, ["basophil", "monocyte"])
    # Every bad setting is named at once.
    with pytest.raises(TeachError, match=r"invalid teach settings: steps .*; replay_share"):
        teach(ensemble, crops, ["a"], config=TeachConfig(steps=0, replay_share=1.0))


def test_d4_views_are_the_eight_symmetries():
    crop = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    views = d4_views(crop)
    assert len(views) == 8
    assert len({v.tobytes() for v in views}) == 8
    assert np.array_equal(views[0], crop)


def test_cells_to_teach_are_unsure_first_and_spread_out():
    rng = np.random.default_rng(0)
    n = 60
    probs = rng.dirichlet(np.ones(3), size=n)
    pos = rng.uniform(0, 1000, size=(n, 2))
    # a clump of ten nearly identical, very unsure cells of one class in one spot
    probs[:10] = [0.34, 0.33, 0.33]
    pos[:10] = 500 + rng.normal(0, 1, size=(10, 2))
    chosen = choose_cells_to_teach(probs, pos, per_class=5)
    pred = probs.argmax(1)
    for c in np.unique(pred):
        assert 1 <= np.sum(pred[chosen] == c) <= 5
    from_clump = np.isin(chosen, np.arange(10)).sum()
    assert from_clump == 1  # the least certain spot is asked about once, not ten times
    class0 = chosen[pred[chosen] == 0]
    assert probs[class0[0]].max() == pytest.approx(probs[pred == 0].max(1).min())
    # without positions the least certain come first, and a small class gives what it has
    few = choose_cells_to_teach(probs[:12], per_class=5)
    assert len(few) <= 12 and len(set(few)) == len(few)
