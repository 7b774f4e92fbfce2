"""Which review signals catch a model's mistakes on other labs? (issue #13)

    python scripts/trust_study.py [--model M] [--per-class 60] [-o outputs/trust]

Fits the trust statistics (temperature, feature centres, thresholds) on PBC
cells only (the model's own lab: training cells for the feature centres, its
validation split for temperature and thresholds), then scores the cells of
the other labs (LISC crops, BCCD cells cut around their boxes) and prints,
per lab and per signal, the AUROC for telling wrong from right predictions
and the share of wrong and of right predictions flagged. Nothing from LISC
or BCCD is used to set anything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from napari_wbc.datasets import (
    balanced_subset,
    load_lab_table,
    load_labelled_crops,
    read_lab_crops,
)
from napari_wbc.features import member_outputs
from napari_wbc.inference import load_any
from napari_wbc.models.files import default_model_path
from napari_wbc.settings import data_root
from napari_wbc.training import TrainConfig, validation_split
from napari_wbc.trust import (
    auroc,
    ensemble_probs,
    expected_calibration_error,
    fit_trust_stats,
    review_flags,
)


def lab_crops(ens, lab: str, table=None):
    table = load_lab_table(lab) if table is None else table
    crops = read_lab_crops(table, ens.fov_px, fov_rbc=ens.fov_rbc)
    return crops, table["label"].to_numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/trust"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    ens = load_any(args.model)
    classes = list(ens.classes)
    index = {c: i for i, c in enumerate(classes)}

    # PBC: the model's training subset and validation split (scripts/train_default_model.sh).
    table = load_labelled_crops(data_root() / "pbc")
    used = balanced_subset(table, per_class=1000, seed=0)
    train, val = validation_split(used, TrainConfig(seed=0, val_fraction=0.2))
    train = balanced_subset(train, per_class=args.per_class, seed=1)
    val = balanced_subset(val, per_class=args.per_class, seed=2)

    def pbc(rows):
        t = rows.assign(lab="pbc", cy=np.nan, cx=np.nan, rbc_px=75.0)
        return lab_crops(ens, "pbc", t)

    def prepared(crops):
        normalizer = ens.preprocessor.crop_normalizer(lambda i: crops[i], len(crops), "auto")
        return crops if normalizer is None else np.stack([normalizer(c) for c in crops])

    fit_crops, fit_labels = pbc(train)
    val_crops, val_labels = pbc(val)
    fit_out = member_outputs(ens, prepared(fit_crops))
    val_crops = prepared(val_crops)
    val_out = member_outputs(ens, val_crops)
    fit_y = np.array([index[v] for v in fit_labels])
    val_y = np.array([index[v] for v in val_labels])
    stats = fit_trust_stats(
        fit_out["logits"],
        fit_out["features"],
        fit_y,
        val_out["logits"],
        val_out["features"],
        val_y,
        ens.weights,
    )
    print(json.dumps({k: v for k, v in stats.to_dict().items() if k != "features"}, indent=1))

    rows = []
    for lab in ("pbc-val", "lisc", "bccd"):
        if lab == "pbc-val":
            out, labels = val_out, val_labels
        else:
            crops, labels = lab_crops(ens, lab)
            out = member_outputs(ens, prepared(crops))
        raw = ensemble_probs(out["logits"], ens.weights)
        cal = ensemble_probs(out["logits"], ens.weights, stats.temperature)
        y = np.array([index[v] for v in labels])
        pred = raw.argmax(1)
        wrong = pred != y
        dist = stats.ood_distance(out["features"])
        member_pred = out["logits"].argmax(2)
        dis = (member_pred != pred[None]).mean(0)
        flags = review_flags(cal.max(1), dis, dist, stats)
        row = {
            "lab": lab,
            "n": len(y),
            "accuracy": float(1 - wrong.mean()),
            "ece_raw": expected_calibration_error(raw, y),
            "ece_cal": expected_calibration_error(cal, y),
            "auroc_conf": auroc(-raw.max(1), wrong),
            "auroc_cal_conf": auroc(-cal.max(1), wrong),
            "auroc_dist": auroc(dist, wrong),
            "auroc_dis": auroc(dis, wrong),
            "ood_share": float(flags["out_of_distribution"].mean()),
            "flag_wrong": float(flags["needs_review"][wrong].mean()) if wrong.any() else None,
            "flag_right": float(flags["needs_review"][~wrong].mean()) if (~wrong).any() else None,
        }
        rows.append(row)
        print(json.dumps(row))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "trust_study.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
