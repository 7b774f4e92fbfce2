"""How far to trust each prediction: calibration, out-of-distribution scores, review flags.

A classifier trained on one lab's cells is confidently wrong on another's
(docs/results.md). Three signals say when a prediction should be checked by a
person, each measured on the model's own validation cells and stored in its
model file (``config.trust``):

- **calibrated confidence**: the top probability after temperature scaling
  (Guo et al. 2017); the temperature is fitted on validation logits by
  minimising the negative log-likelihood;
- **feature distance** (out-of-distribution): the distance of a cell's
  penultimate features to the nearest class centre of the training cells, in
  units of the features' per-dimension spread (a diagonal Mahalanobis
  distance), divided by the number of dimensions;
- **disagreement** between the ensemble's members.

:func:`review_flags` combines them: the one review rule, with its defaults
(:data:`REVIEW_CONFIDENCE`, :data:`REVIEW_DISAGREEMENT`) and the feature
distance threshold set from validation percentiles (:class:`TrustStats`);
the smear pipeline's ``needs_review`` column is its answer. Pure numpy: no
torch, no Qt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .errors import WBCError

#: Share of the validation cells the feature-distance threshold lets pass.
OOD_QUANTILE = 0.99
#: Calibrated confidence below this is flagged for review.
REVIEW_CONFIDENCE = 0.6
#: Member disagreement (the share of members whose top class differs from
#: the ensemble's, 0–1) above this is flagged for review: any disagreement.
REVIEW_DISAGREEMENT = 0.0
#: Share of an image's cells that look out of distribution above which the
#: whole image is called unlike the training data.
IMAGE_OOD_SHARE = 0.3


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` over the last axis (the classes)."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ensemble_probs(
    member_logits: np.ndarray, weights: np.ndarray | None = None, temperature: float = 1.0
) -> np.ndarray:
    """Weighted mean over members of ``softmax(logits / temperature)``.

    ``member_logits`` is (M, N, C), or (N, C) for one model.
    """
    logits = np.asarray(member_logits, np.float64)
    if logits.ndim == 2:
        logits = logits[None]
    w = np.ones(len(logits)) if weights is None else np.asarray(weights, float)
    w = w / w.sum()
    return np.einsum("m,mnc->nc", w, np.stack([softmax(z, temperature) for z in logits]))


def fit_temperature(
    member_logits: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels``.

    Parameters
    ----------
    member_logits : (M, N, C) or (N, C) array
        Logits of each ensemble member (averaged over test-time views).
    labels : (N,) int array of class indices
    weights : (M,) array, optional
        Member weights.

    Returns
    -------
    float
        T > 0; every member's logits are divided by it before the softmax.
    """
    from scipy.optimize import minimize_scalar

    logits = np.asarray(member_logits, np.float64)
    labels = np.asarray(labels, int)
    if logits.shape[-2] != len(labels) or len(labels) < 10:
        raise WBCError("fitting a temperature needs at least 10 labelled cells with their logits")
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        p = ensemble_probs(logits, weights, np.exp(log_t))
        return -float(np.mean(np.log(p[rows, labels] + 1e-12)))

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy − confidence| averaged over confidence bins."""
    probs = np.asarray(probs, float)
    labels = np.asarray(labels, int)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return float(ece)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` from the rest.

    The Mann–Whitney statistic with ties counted half; NaN when one group is empty.
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, float)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class FeatureStats:
    """Class centres and per-dimension spread of one member's penultimate features."""

    centres: np.ndarray  # (C, D)
    scale: np.ndarray  # (D,)

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, n_classes: int) -> FeatureStats:
        """Centres per class and the pooled within-class standard deviation."""
        features = np.asarray(features, np.float64)
        labels = np.asarray(labels, int)
        centres = np.zeros((n_classes, features.shape[1]))
        residual = np.empty_like(features)
        for c in range(n_classes):
            rows = labels == c
            if rows.any():
                centres[c] = features[rows].mean(axis=0)
                residual[rows] = features[rows] - centres[c]
        scale = np.sqrt((residual**2).mean(axis=0)) + 1e-6
        return cls(centres, scale)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mean squared standardised distance to the nearest class centre (≈ 1 inside)."""
        z = (np.asarray(features, np.float64)[:, None, :] - self.centres[None]) / self.scale
        return (z**2).mean(axis=2).min(axis=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "centres": np.round(self.centres, 5).tolist(),
            "scale": np.round(self.scale, 6).tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        return cls(np.asarray(d["centres"], float), np.asarray(d["scale"], float))


@dataclass
class TrustStats:
    """What a model file stores to judge its own predictions (``config.trust``).

    ``temperature`` scales the ensemble's mean logits; ``ood_threshold`` is the
    :data:`OOD_QUANTILE` quantile of the validation cells' feature distance;
    ``ece_before``/``ece_after`` document the calibration on validation.
    """

    temperature: float = 1.0
    ood_threshold: float = float("inf")
    ece_before: float | None = None
    ece_after: float | None = None
    n_validation: int = 0
    features: list[FeatureStats] = field(default_factory=list)  # one per member
    extra: dict[str, Any] = field(default_factory=dict)

    def ood_distance(self, member_features: list[np.ndarray]) -> np.ndarray | None:
        """Mean over members of each cell's feature distance; None without feature stats."""
        if not self.features:
            return None
        if len(member_features) != len(self.features):
            raise WBCError(
                f"trust statistics describe {len(self.features)} members, "
                f"got features of {len(member_features)}"
            )
        return np.mean(
            [s.distance(f) for s, f in zip(self.features, member_features, strict=True)], axis=0
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = [f.to_dict() for f in self.features]
        if not np.isfinite(self.ood_threshold):
            d["ood_threshold"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TrustStats:
        if not d:
            return cls()
        d = dict(d)
        feats = d.pop("features", None) or []
        if d.get("ood_threshold") is None:
            d["ood_threshold"] = float("inf")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known, features=[FeatureStats.from_dict(f) for f in feats])


def fit_trust_stats(
    fit_logits: np.ndarray,
    fit_features: list[np.ndarray],
    fit_labels: np.ndarray,
    val_logits: np.ndarray,
    val_features: list[np.ndarray],
    val_labels: np.ndarray,
    weights: np.ndarray | None = None,
    ood_features: list[np.ndarray] | None = None,
) -> TrustStats:
    """Trust statistics from the model's own lab, never from the cells it will judge.

    Feature centres come from training cells (``fit_*``); the temperature and
    the out-of-distribution threshold from validation cells (``val_*``).
    Logits are (M, N, C) per member, features a list of (N, D_m) arrays and
    labels class indices. ``ood_features``: the cells the threshold is set on
    instead of the validation cells (a model trained on several labs: cells of
    every one of them, none of those the centres came from).
    """
    n_classes = np.asarray(fit_logits).shape[-1]
    features = [FeatureStats.fit(f, fit_labels, n_classes) for f in fit_features]
    temperature = fit_temperature(val_logits, val_labels, weights)
    stats = TrustStats(temperature=temperature, features=features)
    distance = stats.ood_distance(val_features if ood_features is None else ood_features)
    stats.ood_threshold = float(np.quantile(distance, OOD_QUANTILE))
    stats.ece_before = expected_calibration_error(ensemble_probs(val_logits, weights), val_labels)
    stats.ece_after = expected_calibration_error(
        ensemble_probs(val_logits, weights, temperature), val_labels
    )
    stats.n_validation = len(val_labels)
    return stats


def review_flags(
    confidence: np.ndarray,
    disagreement: np.ndarray,
    ood_distance: np.ndarray | None = None,
    stats: TrustStats | None = None,
    min_confidence: float = REVIEW_CONFIDENCE,
    max_disagreement: float = REVIEW_DISAGREEMENT,
) -> dict[str, np.ndarray | None]:
    """Per-cell reasons to review and their union (``needs_review``): the review rule.

    Parameters
    ----------
    confidence : (N,) array
        The ensemble's (calibrated) top probability per cell.
    disagreement : (N,) array
        Share of members disagreeing with the ensemble
        (:func:`napari_wbc.inference.disagreement`).
    ood_distance : (N,) array, optional
        Feature distance to the training cells; with ``stats``' threshold it
        flags cells unlike them.
    stats : TrustStats, optional
        The model's trust statistics (its ``ood_threshold``).
    min_confidence, max_disagreement : float
        Flag a confidence below, a disagreement above.

    Returns
    -------
    dict
        Boolean arrays ``low_confidence``, ``disagreement``,
        ``out_of_distribution`` and ``needs_review`` (any of them), and
        ``ood_score``: the distance in units of the threshold (above 1:
        unlike the training cells), or None without a distance and statistics.
    """
    low = np.asarray(confidence) < min_confidence
    dis = np.asarray(disagreement) > max_disagreement
    score = None
    if ood_distance is not None and stats is not None:
        # In units of the model's threshold (the 99th percentile on its
        # validation cells): above 1, unlike them.
        score = np.asarray(ood_distance, float) / stats.ood_threshold
    ood = np.zeros_like(low) if score is None else score > 1.0
    return {
        "low_confidence": low,
        "disagreement": dis,
        "out_of_distribution": ood,
        "needs_review": low | dis | ood,
        "ood_score": score,
    }


def image_warning(out_of_distribution: np.ndarray, share: float = IMAGE_OOD_SHARE) -> str | None:
    """A message when a large share of one image's cells look out of distribution."""
    ood = np.asarray(out_of_distribution, bool)
    if len(ood) < 5 or ood.mean() <= share:
        return None
    return (
        f"{ood.mean():.0%} of the cells look unlike the model's training data: this smear "
        "may come from another lab, stain or camera than the model learned from. Check the "
        "counts, and consider fine-tuning on a few corrected cells."
    )
