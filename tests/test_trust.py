"""Review signals: temperature scaling, calibration error, feature distance, flags."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wbc.errors import WBCError
from napari_wbc.trust import (
    FeatureStats,
    TrustStats,
    auroc,
    ensemble_probs,
    expected_calibration_error,
    fit_temperature,
    fit_trust_stats,
    image_warning,
    review_flags,
    softmax,
)


def _overconfident(n=2000, c=4, seed=0):
    """Logits whose true temperature is 3: the model is overconfident."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 1.5, (n, c))
    p = softmax(true_logits)
    labels = np.array([rng.choice(c, p=row) for row in p])
    return 3.0 * true_logits, labels


def test_temperature_recovers_overconfidence_and_lowers_ece():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, t), labels)
    assert after < before / 2


def test_temperature_of_an_ensemble_uses_every_member():
    logits, labels = _overconfident()
    members = np.stack([logits, logits])
    assert fit_temperature(members, labels) == pytest.approx(fit_temperature(logits, labels))
    probs = ensemble_probs(members, np.array([1.0, 3.0]))
    np.testing.assert_allclose(probs.sum(1), 1.0)


def test_temperature_needs_enough_cells():
    with pytest.raises(WBCError, match="at least 10"):
        fit_temperature(np.zeros((3, 4)), np.zeros(3, int))


def test_ece_is_zero_when_confidence_matches_accuracy():
    probs = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.array([1, 1, 1, 1])) == pytest.approx(0.75)


def test_auroc_orders_and_handles_ties():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    assert np.isnan(auroc([0.1, 0.2], [True, True]))


def test_feature_distance_grows_away_from_the_training_cells():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0] * 8, [5.0] * 8])
    labels = rng.integers(0, 2, 500)
    feats = centres[labels] + rng.normal(0, 1, (500, 8))
    stats = FeatureStats.fit(feats, labels, 2)
    near = stats.distance(centres[labels[:50]] + rng.normal(0, 1, (50, 8)))
    far = stats.distance(np.full((50, 8), 20.0))
    assert near.mean() == pytest.approx(1.0, abs=0.3)
    assert far.min() > 10 * near.max()
    again = FeatureStats.from_dict(stats.to_dict())
    np.testing.assert_allclose(again.distance(feats[:5]), stats.distance(feats[:5]), rtol=1e-4)


def test_trust_stats_flag_shifted_cells_and_round_trip():
    rng = np.random.default_rng(1)
    n, c = 400, 3
    labels = rng.integers(0, c, n)
    feats = np.eye(c)[labels] * 4 + rng.normal(0, 1, (n, c))
    logits = feats[None] * 2.0  # one member
    stats = fit_trust_stats(logits, [feats], labels, logits, [feats], labels)
    assert stats.n_validation == n and stats.ece_after <= stats.ece_before + 1e-9
    shifted = feats + 10.0
    dist = stats.ood_distance([shifted])
    flags = review_flags(np.full(n, 0.99), np.zeros(n), dist, stats)
    assert flags["out_of_distribution"].all() and flags["needs_review"].all()
    in_dist = review_flags(np.full(n, 0.99), np.zeros(n), stats.ood_distance([feats]), stats)
    assert in_dist["out_of_distribution"].mean() <= 0.02
    again = TrustStats.from_dict(stats.to_dict())
    np.testing.assert_allclose(again.ood_distance([feats]), stats.ood_distance([feats]), rtol=1e-4)
    assert again.temperature == pytest.approx(stats.temperature)
    with pytest.raises(WBCError, match="1 members"):
        stats.ood_distance([feats, feats])


def test_flags_without_feature_stats_use_confidence_and_disagreement():
    stats = TrustStats()
    flags = review_flags(np.array([0.9, 0.4, 0.9]), np.array([0.0, 0.0, 0.5]), None, stats)
    assert flags["needs_review"].tolist() == [False, True, True]
    assert not flags["out_of_distribution"].any()


def test_image_warning_only_when_many_cells_look_foreign():
    assert image_warning(np.array([True] * 2 + [False] * 8)) is None
    message = image_warning(np.array([True] * 8 + [False] * 2))
    assert "80%" in message and "fine-tuning" in message
    assert image_warning(np.array([True, True])) is None  # too few cells to say
