"""Do the review flags catch a model's mistakes on other labs? (issue #13)

    python scripts/fit_trust.py          # once: the trust statistics, from PBC only
    python -m research.trust_study [--model M] [-o outputs/trust]

Classifies cells as ``napari-wbc classify`` does (the ensemble's TTA,
calibrated confidence, feature distance to the training cells, member
disagreement, the default review thresholds) and prints, per lab: accuracy,
calibration error before and after temperature scaling, the AUROC for
telling wrong from right predictions of the review score and of the raw
confidence alone, the share of cells that look unlike the training cells, and
the share of wrong and of right predictions flagged for review. The
statistics come from PBC alone (scripts/fit_trust.py); nothing from LISC or
BCCD is used to set anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scripts.fit_trust import pbc_samples

from napari_wbc.datasets import load_lab_table, read_lab_crops
from napari_wbc.inference import disagreement, load_any, predict_crops
from napari_wbc.models.files import default_model_path
from napari_wbc.pipeline import ClassifyConfig
from napari_wbc.trust import auroc, ensemble_probs, expected_calibration_error, image_warning


def lab_crops(ens, lab: str, table=None):
    table = load_lab_table(lab) if table is None else table
    crops = read_lab_crops(table, ens.fov_px, fov_rbc=ens.fov_rbc)
    return crops, table["label"].to_numpy()


def review_score(confidence, disagreement, ood_score, min_confidence):
    """One number per cell: above 1 (or any disagreement) is flagged by classify.

    The larger of the low-confidence ratio ``(1 - confidence) / (1 - min_confidence)``
    and the feature-distance ratio ``ood_score``, plus the members' disagreement.
    """
    low = (1.0 - np.asarray(confidence)) / (1.0 - min_confidence)
    return np.maximum(low, np.asarray(ood_score)) + np.asarray(disagreement)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/trust"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ens = load_any(args.model)
    if ens.trust is None:
        raise SystemExit(f"{args.model} has no trust statistics: run scripts/fit_trust.py")
    stats = ens.trust
    classes = list(ens.classes)
    index = {c: i for i, c in enumerate(classes)}
    config = ClassifyConfig()

    # PBC's validation sample as scripts/fit_trust.py drew it (its feature
    # centres and temperature came from there: an in-lab check, not a test).
    _, val = pbc_samples(args.per_class)
    val = val.assign(lab="pbc", cy=np.nan, cx=np.nan, rbc_px=75.0)

    def prepared(crops):
        normalizer = ens.preprocessor.crop_normalizer(lambda i: crops[i], len(crops), "auto")
        return crops if normalizer is None else np.stack([normalizer(c) for c in crops])

    rows = []
    for lab in ("pbc-val", "lisc", "bccd"):
        crops, labels = lab_crops(ens, "pbc", val) if lab == "pbc-val" else lab_crops(ens, lab)
        # As napari-wbc classify does: the ensemble's TTA, calibrated, with distances.
        out = predict_crops(ens, prepared(crops))
        y = np.array([index[v] for v in labels])
        raw = ensemble_probs(out["member_logits"], ens.weights)
        cal = out["probs"]
        pred = cal.argmax(1)
        wrong = pred != y
        dis = disagreement(out["member_probs"], cal)
        ood_score = out["ood_distance"] / stats.ood_threshold
        low = cal.max(1) < config.review_confidence
        disagree = dis > config.review_disagreement
        ood = ood_score > 1.0
        flagged = low | disagree | ood
        score = review_score(cal.max(1), dis, ood_score, config.review_confidence)
        row = {
            "lab": lab,
            "n": len(y),
            "accuracy": float(1 - wrong.mean()),
            "ece_raw": expected_calibration_error(raw, y),
            "ece_calibrated": expected_calibration_error(cal, y),
            "auroc_confidence": auroc(-raw.max(1), wrong),
            "auroc_review_score": auroc(score, wrong),
            "auroc_ood": auroc(ood_score, wrong),
            "out_of_distribution_share": float(ood.mean()),
            "image_warning": image_warning(ood) is not None,
            "wrong_flagged": float(flagged[wrong].mean()) if wrong.any() else None,
            "right_flagged": float(flagged[~wrong].mean()) if (~wrong).any() else None,
            "wrong_flagged_by_confidence_alone": float(low[wrong].mean()) if wrong.any() else None,
        }
        rows.append(row)
        print(json.dumps(row))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "trust_study.json").write_text(json.dumps(rows, indent=1))
    print(
        "| cells | n | accuracy | ECE raw → calibrated | AUROC confidence | AUROC review score "
        "| unlike training | wrong flagged | right flagged |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['lab']} | {r['n']} | {r['accuracy']:.3f} | {r['ece_raw']:.3f} → "
            f"{r['ece_calibrated']:.3f} | {r['auroc_confidence']:.3f} | "
            f"{r['auroc_review_score']:.3f} | {r['out_of_distribution_share']:.0%} | "
            f"{r['wrong_flagged']:.0%} | {r['right_flagged']:.0%} |"
        )


if __name__ == "__main__":
    main()
