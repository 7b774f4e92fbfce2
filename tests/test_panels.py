"""Count panels: a model answering with some of its classes (napari_wbc.panels)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_wbc.inference import Ensemble, EnsembleMember, predict_crops
from napari_wbc.models.build import build_model
from napari_wbc.models.files import ModelConfig
from napari_wbc.models.registry import get_preset
from napari_wbc.panels import FIVE_PART, PanelError, panel_classes, restrict_classes
from napari_wbc.trust import FeatureStats, TrustStats


@pytest.fixture(scope="module")
def ensemble():
    members = []
    for seed, spec in enumerate(get_preset("tiny")):
        torch.manual_seed(seed)
        model, _ = build_model(spec)
        members.append(EnsembleMember(model.eval(), ModelConfig(spec=spec, name=spec.name), 1.0))
    return Ensemble(members, tta="none", name="tiny")


def _crops(n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 40, 40, 3), dtype=np.uint8)


def test_a_panel_renormalises_each_members_probabilities_over_its_classes(ensemble):
    crops = _crops()
    full = predict_crops(ensemble, crops)
    heads = [m.model.get_classifier().weight.detach().clone() for m in ensemble.members]
    five = restrict_classes(ensemble, "5-part")
    out = predict_crops(five, crops)
    assert out["classes"] == FIVE_PART
    keep = [ensemble.classes.index(c) for c in FIVE_PART]
    # One view: a member's softmax over the kept logits is its full softmax
    # renormalised over the kept classes.
    expected = full["member_probs"][:, :, keep]
    expected /= expected.sum(axis=2, keepdims=True)
    np.testing.assert_allclose(out["member_probs"], expected, atol=1e-5)
    assert [FIVE_PART[i] for i in out["pred"]] == [
        FIVE_PART[i] for i in expected.mean(0).argmax(1)
    ]
    # The model it came from answers as before, with all its classes.
    again = predict_crops(ensemble, crops)
    np.testing.assert_array_equal(again["probs"], full["probs"])
    assert all(
        torch.equal(h, m.model.get_classifier().weight)
        for h, m in zip(heads, ensemble.members, strict=True)
    )


def test_panel_names_are_checked_with_a_message_that_lists_the_classes(ensemble):
    classes = ensemble.classes
    assert panel_classes(None, classes) is None
    assert panel_classes("all", classes) is None
    assert restrict_classes(ensemble, "all") is ensemble
    assert restrict_classes(ensemble, ",".join(classes)) is ensemble
    # Names in any order come back in the model's order.
    assert panel_classes("neutrophil, basophil", classes) == ("basophil", "neutrophil")
    assert panel_classes(["monocyte", "lymphocyte"], classes) == ("lymphocyte", "monocyte")
    with pytest.raises(PanelError, match=r"no class 'band'.*neutrophil"):
        panel_classes("band,neutrophil", classes)
    with pytest.raises(PanelError, match="at least two classes"):
        panel_classes("neutrophil", classes)


def test_a_cell_of_a_class_outside_the_panel_lies_farther_from_its_classes():
    # Feature centres of classes 0, 1, 2; a cell at class 2's centre.
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    stats = TrustStats(features=[FeatureStats(centres=centres, scale=np.ones(2))])
    cell = [np.array([[0.0, 4.0]])]
    assert stats.ood_distance(cell)[0] == pytest.approx(0.0)
    kept = TrustStats(features=[FeatureStats(centres=centres[[0, 1]], scale=np.ones(2))])
    assert kept.ood_distance(cell)[0] > 1.0


def test_restricted_trust_keeps_the_panels_centres_and_calibration(ensemble):
    import dataclasses

    rng = np.random.default_rng(1)
    stats = [
        FeatureStats(centres=rng.normal(size=(8, 4)), scale=np.ones(4)) for _ in ensemble.members
    ]
    trusted = dataclasses.replace(
        ensemble, trust=TrustStats(temperature=1.7, ood_threshold=3.0, features=stats)
    )
    two = restrict_classes(trusted, ["ig", "platelet"])
    assert two.trust.temperature == 1.7 and two.trust.ood_threshold == 3.0
    for full, kept in zip(stats, two.trust.features, strict=True):
        np.testing.assert_array_equal(kept.centres, full.centres[[3, 7]])
    assert trusted.trust.features[0].centres.shape == (8, 4)


def test_one_view_passes_of_the_full_model_carry_over_to_its_panel(ensemble):
    import dataclasses

    from napari_wbc.gate import iter_predict_sums
    from napari_wbc.panels import restrict_passes
    from napari_wbc.progress import run

    trusted = dataclasses.replace(
        ensemble, trust=TrustStats(temperature=1.3, ood_threshold=3.0, features=[])
    )
    crops = _crops()
    five = restrict_classes(trusted, "5-part")
    carried = restrict_passes(run(iter_predict_sums(trusted, crops, tta="none")), five)
    fresh = run(iter_predict_sums(five, crops, tta="none"))
    assert carried.ensemble is five
    np.testing.assert_allclose(carried.sums["logits"], fresh.sums["logits"], atol=1e-5)
    np.testing.assert_allclose(carried.sums["probs"], fresh.sums["probs"], atol=1e-5)
    for a, b in zip(carried.sums["features"], fresh.sums["features"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Several views, whose probabilities were summed after the softmax: not.
    assert restrict_passes(run(iter_predict_sums(trusted, crops, tta="flips")), five) is None
