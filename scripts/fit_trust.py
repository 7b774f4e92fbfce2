"""Fit an ensemble's trust statistics on its own lab and store them in its file.

    python scripts/fit_trust.py [--model ENSEMBLE.json] [--per-class 60] [--tta d4]
        [--split crosslab|pbc-subset]

The statistics (napari_wbc.trust.TrustStats) judge each prediction at
classify time: the temperature that calibrates the confidence, the class
centres and spread of every member's penultimate features, and the feature
distance above which a cell looks unlike the training cells (the 99th
percentile on validation cells). They are fitted on the cells the model
learned from and on cells it kept out of training, as its training split them:

* ``--split crosslab`` (the built-in model, ``napari-wbc train --labs``):
  feature centres on a seeded sample of the training cells of every lab the
  model was trained on (PBC's training split and the others), the temperature
  on a seeded sample of PBC's validation split (20 % per class, seed 0), the one
  split never trained on, and the threshold on that sample together with as many
  other cells of each other lab (none of those the centres came from), so that a
  cell is flagged when it is unlike every training lab, not only unlike PBC;
* ``--split pbc-subset`` (the earlier PBC-only model,
  scripts/train_default_model.sh): both on PBC, from that script's subset.

Features and logits are averaged over the ensemble's own test-time
augmentation set, as at classify time.

The ensemble file is rewritten atomically with a ``trust`` entry; members,
weights and descriptions are kept.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_wbc.datasets import (
    balanced_subset,
    load_lab_table,
    load_labelled_crops,
    read_lab_crops,
    stratified_split,
)
from napari_wbc.features import member_outputs
from napari_wbc.inference import load_any
from napari_wbc.models.files import default_model_path, read_ensemble, save_ensemble
from napari_wbc.settings import data_root
from napari_wbc.training import TrainConfig, validation_split
from napari_wbc.trust import fit_trust_stats


def pbc_samples(per_class: int):
    """Seeded training and validation samples of PBC, as the earlier PBC-only model split it."""
    table = load_labelled_crops(data_root() / "pbc")
    used = balanced_subset(table, per_class=1000, seed=0)
    train, val = validation_split(used, TrainConfig(seed=0, val_fraction=0.2))
    train = balanced_subset(train, per_class=per_class, seed=1)
    val = balanced_subset(val, per_class=per_class, seed=2)
    as_lab = {"lab": "pbc", "cy": np.nan, "cx": np.nan, "rbc_px": 75.0}
    return train.assign(**as_lab), val.assign(**as_lab)


def crosslab_samples(per_class: int, classes, labs=("pbc", "lisc", "bccd")):
    """Seeded samples as ``napari-wbc train --labs`` split the labs the model was trained on.

    Returns the cells for the feature centres, PBC's validation sample and, for
    the threshold, a sample of each other lab disjoint from the centres' cells.
    """
    pbc = load_lab_table("pbc", classes=classes)
    tr, va = stratified_split(pbc["label"].tolist(), 0.2, seed=0)
    parts = [balanced_subset(pbc.iloc[tr], per_class=per_class, seed=1)]
    others = []
    for lab in [lab for lab in labs if lab != "pbc"]:
        table = load_lab_table(lab)
        fit = balanced_subset(table, per_class=per_class // 2, seed=1)
        parts.append(fit)
        rest = table[~table["path"].isin(fit["path"]) | ~table["cy"].isin(fit["cy"])]
        others.append(balanced_subset(rest, per_class=per_class // 2, seed=2))
    train = pd.concat(parts, ignore_index=True)
    val = balanced_subset(pbc.iloc[va], per_class=per_class, seed=2)
    return train, val, pd.concat(others, ignore_index=True) if others else val.iloc[:0]


def model_crops(ens, rows) -> np.ndarray:
    """Crops at the model's field of view, stain-normalised as classify does for crops."""
    crops = read_lab_crops(rows, ens.fov_px, fov_rbc=ens.fov_rbc)
    normalizer = ens.preprocessor.crop_normalizer(lambda i: crops[i], len(crops), "auto")
    return crops if normalizer is None else np.stack([normalizer(c) for c in crops])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--tta", default=None, help="default: the ensemble's own set")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", choices=["crosslab", "pbc-subset"], default="crosslab")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ens = load_any(args.model)
    tta = args.tta or ens.tta
    index = {c: i for i, c in enumerate(ens.classes)}
    if args.split == "crosslab":
        labs = ens.members[0].config.training.get("labs", ("pbc", "lisc", "bccd"))
        train, val, others = crosslab_samples(args.per_class, ens.classes, labs)
    else:
        train, val = pbc_samples(args.per_class)
        others = val.iloc[:0]
    fit = member_outputs(ens, model_crops(ens, train), tta=tta)
    check = member_outputs(ens, model_crops(ens, val), tta=tta)
    ood_features = None
    if len(others):
        more = member_outputs(ens, model_crops(ens, others), tta=tta)["features"]
        ood_features = [
            np.concatenate([a, b]) for a, b in zip(check["features"], more, strict=True)
        ]
    stats = fit_trust_stats(
        fit["logits"],
        fit["features"],
        np.array([index[v] for v in train["label"]]),
        check["logits"],
        check["features"],
        np.array([index[v] for v in val["label"]]),
        ens.weights,
        ood_features=ood_features,
    )
    stats.extra = {
        "fitted_on": f"{len(train)} training cells "
        f"({', '.join(f'{k} {v}' for k, v in train['lab'].value_counts().items())}) and "
        f"{len(val)} PBC validation crops (split {args.split}, seeds 1 and 2)"
        + (
            f"; threshold also on {len(others)} other cells "
            f"({', '.join(f'{k} {v}' for k, v in others['lab'].value_counts().items())})"
            if len(others)
            else ""
        )
        + f", TTA {tta}",
        "script": "scripts/fit_trust.py",
    }
    config = read_ensemble(args.model)
    save_ensemble(
        args.model,
        [m.path for m in config.members],
        [m.weight for m in config.members],
        config.tta,
        name=config.name,
        metrics=config.metrics,
        notes=config.notes,
        trust=stats.to_dict(),
        fov_scale=config.fov_scale,
    )
    summary = {k: v for k, v in stats.to_dict().items() if k != "features"}
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.model} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
