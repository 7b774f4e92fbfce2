"""How far can teaching take BCCD with all of its own labels? (issue #33)

    python -m research.bccd_teach_ceiling outputs/crosslab2/in-bccd/model.safetensors

The BCCD fold model (never trained on BCCD) is taught, with
:func:`napari_wbc.teach.teach` and its defaults, every BCCD cell of four of
five folds (split by field, so a field's cells stay together; BCCD's two
basophils are neither taught nor scored) and scored with D4 on the fifth, in
turn: the most the teach path can make of BCCD's per-image labels. Compared
with the five cells per class of ``benchmarks/bench_teach.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_teach import d4_probs, held_out_cells, replay_stats, view_features

from napari_wbc.metrics import classification_metrics
from napari_wbc.teach import teach


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ensemble, fov, table, crops, labels, y, scored = held_out_cells(args.model, "bccd")
    classes = tuple(ensemble.classes)
    fields = table["path"].to_numpy()
    unique = np.unique(fields)
    fold_of_field = dict(
        zip(
            np.random.default_rng(0).permutation(unique),
            np.arange(len(unique)) % args.folds,
            strict=True,
        )
    )
    fold = np.array([fold_of_field[f] for f in fields])
    stats = replay_stats(ensemble, "bccd", classes, fov)[0]
    feats = view_features(ensemble, crops)[0]
    pred = np.zeros(len(y), int)
    for k in range(args.folds):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        model = teach(ensemble, crops[train], labels[train], replay=[stats])
        pred[test] = d4_probs(model.members[0].model, [f[test] for f in feats]).argmax(1)
        print(f"fold {k}: taught {len(train)} cells, scored {len(test)}", flush=True)
    m = classification_metrics(y, pred, classes)
    out = {
        "macro_f1": round(float(np.mean([m["per_class"][c]["f1"] for c in scored])), 4),
        "per_class_f1": {c: round(float(m["per_class"][c]["f1"]), 3) for c in scored},
        "cells": len(y),
        "folds": args.folds,
    }
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
