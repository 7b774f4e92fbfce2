"""Does prototype adaptation (T3A) on top of a taught classifier help? Chosen without the lab scored (issue #33)

    python -m research.teach_adapt outputs/crosslab2 --json docs/crosslab/teach-adapt.json

The protocol of ``benchmarks/bench_teach.py``: a fold model is taught
``--cells`` cells per class of its held-out lab (seeds 0-2, the defaults of
:class:`napari_wbc.teach.TeachConfig`), then scores the rest of that lab with
the eight D4 views. Variants of what happens after teaching, all on the same
features:

- ``teach``: the taught classifier as it is (the product today);
- ``teach+t3a``: T3A as :func:`napari_wbc.adapt.adapt_prototypes` does it (each
  class's unit weight vector plus the unit features of the ``--support`` most
  certain cells predicted as that class, over the cells being classified), on
  the taught classifier;
- ``teach+t3a+taught``: the same, with the taught cells joining their own
  class's prototype under their given label.

For fold X a variant is chosen by its mean macro-F1 on the two other folds; X's
own score under each variant is printed apart and never used to choose it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_teach import held_out_cells, replay_stats, view_features

from napari_wbc.metrics import classification_metrics
from napari_wbc.models.build import classifier_modules
from napari_wbc.teach import teach

FOLDS = ("raabin", "lisc", "bccd")
VARIANTS = ("teach", "teach+t3a", "teach+t3a+taught")


def unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def t3a_head(weight, bias, feats, support, taught_feats=None, taught_y=None):
    """Weights (no bias) of the T3A prototypes built on ``feats`` (N, D)."""
    logits = feats @ weight.T + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(1)
    pred = logits.argmax(1)
    z = unit(feats)
    protos = []
    for k in range(len(weight)):
        cells = np.flatnonzero(pred == k)
        cells = cells[np.argsort(entropy[cells], kind="stable")[:support]]
        proto = unit(weight[k]) + z[cells].sum(0)
        if taught_feats is not None:
            proto = proto + unit(taught_feats[taught_y == k]).sum(0)
        protos.append(unit(proto))
    return np.stack(protos) * np.linalg.norm(weight, axis=1).mean()


def d4_scores(views, weight, bias) -> np.ndarray:
    out = 0
    for f in views:
        lg = f @ weight.T + bias
        p = np.exp(lg - lg.max(1, keepdims=True))
        out = out + p / p.sum(1, keepdims=True)
    return out / len(views)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("--cells", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--support", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scores: dict[str, dict[str, list[float]]] = {}
    for lab in FOLDS:
        ensemble, fov, _, crops, labels, y, scored = held_out_cells(
            args.root / f"in-{lab}" / "model.safetensors", lab
        )
        classes = tuple(ensemble.classes)
        stats = replay_stats(ensemble, lab, classes, fov)[0]
        views = [f.numpy().astype(np.float64) for f in view_features(ensemble, crops)[0]]
        scores[lab] = {v: [] for v in VARIANTS}
        for seed in range(args.seeds):
            rng = np.random.default_rng([seed, args.cells])
            taught = np.concatenate(
                [
                    rng.choice(np.flatnonzero(labels == c), size=args.cells, replace=False)
                    for c in scored
                ]
            )
            model = teach(ensemble, crops[taught], labels[taught], replay=[stats])
            (head,) = classifier_modules(model.members[0].model)
            w = head.weight.detach().numpy().astype(np.float64)
            b = head.bias.detach().numpy().astype(np.float64)
            rest = np.setdiff1d(np.arange(len(y)), taught)
            rest_views = [f[rest] for f in views]
            heads = {
                "teach": (w, b),
                "teach+t3a": (t3a_head(w, b, views[0][rest], args.support), 0.0),
                "teach+t3a+taught": (
                    t3a_head(w, b, views[0][rest], args.support, views[0][taught], y[taught]),
                    0.0,
                ),
            }
            for name, (hw, hb) in heads.items():
                prob = d4_scores(rest_views, hw, hb)
                m = classification_metrics(y[rest], prob.argmax(1), classes)
                scores[lab][name].append(float(np.mean([m["per_class"][c]["f1"] for c in scored])))
            print(lab, seed, {k: round(v[-1], 4) for k, v in scores[lab].items()}, flush=True)
    print(f"\n{args.cells} taught cells a class, seeds 0-{args.seeds - 1}, D4")
    print("| after teaching | " + " | ".join(FOLDS) + " |")
    print("|---|" + "---:|" * len(FOLDS))
    for v in VARIANTS:
        print(f"| {v} | " + " | ".join(f"{np.mean(scores[lab][v]):.3f}" for lab in FOLDS) + " |")
    choice = {}
    for lab in FOLDS:
        others = [o for o in FOLDS if o != lab]
        best = max(VARIANTS, key=lambda v: np.mean([np.mean(scores[o][v]) for o in others]))
        choice[lab] = {
            "chosen on other folds": best,
            "score": round(np.mean(scores[lab][best]), 4),
        }
        print(lab, choice[lab])
    if args.json:
        args.json.write_text(json.dumps({"scores": scores, "choice": choice}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
