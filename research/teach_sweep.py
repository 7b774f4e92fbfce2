"""How should the classifier be refit to a few taught cells? Chosen without the lab scored (issue #33)

    python -m research.teach_sweep outputs/crosslab2 --json docs/crosslab/teach-sweep.json

The protocol of ``benchmarks/bench_teach.py`` (a fold model taught ``--cells``
cells per class of its held-out lab, drawn with seeds 0-2, then scored with D4
on the rest of that lab) under a grid of :class:`napari_wbc.teach.TeachConfig`
settings (replay share, optimiser steps, learning rate). For fold X the
setting is chosen by its mean macro-F1 on the two other folds; X's own score
under each setting is printed apart and never used to choose it.
Results: docs/log/accuracy.md (2026-12-07, teaching).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_teach import d4_probs, held_out_cells, replay_stats, view_features

from napari_wbc.metrics import classification_metrics
from napari_wbc.teach import TeachConfig, teach

FOLDS = ("raabin", "lisc", "bccd")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--cells", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--replay-share", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--steps", type=int, nargs="+", default=[200, 500])
    p.add_argument("--lr", type=float, nargs="+", default=[3e-3, 1e-2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = list(itertools.product(args.replay_share, args.steps, args.lr))
    names = [f"replay {r} / {s} steps / lr {lr:g}" for r, s, lr in grid]
    scores: dict[str, dict[str, float]] = {}
    for lab in FOLDS:
        ensemble, fov, _, crops, labels, y, scored = held_out_cells(
            args.root / f"in-{lab}" / "model.safetensors", lab
        )
        classes = tuple(ensemble.classes)
        stats = replay_stats(ensemble, lab, classes, fov)[0]
        feats = view_features(ensemble, crops)[0]
        scores[lab] = {}
        for name, (share, steps, lr) in zip(names, grid, strict=True):
            f1s = []
            for seed in range(args.seeds):
                rng = np.random.default_rng([seed, args.cells])
                taught = np.concatenate(
                    [
                        rng.choice(np.flatnonzero(labels == c), size=args.cells, replace=False)
                        for c in scored
                    ]
                )
                config = TeachConfig(replay_share=share, steps=steps, lr=lr)
                model = teach(
                    ensemble, crops[taught], labels[taught], config=config, replay=[stats]
                )
                rest = np.setdiff1d(np.arange(len(y)), taught)
                probs = d4_probs(model.members[0].model, [f[rest] for f in feats])
                m = classification_metrics(y[rest], probs.argmax(1), classes)
                f1s.append(float(np.mean([m["per_class"][c]["f1"] for c in scored])))
            scores[lab][name] = float(np.mean(f1s))
            print(lab, name, round(scores[lab][name], 4), flush=True)
    print("| setting | " + " | ".join(FOLDS) + " | mean |")
    print("|---|" + "---:|" * (len(FOLDS) + 1))
    for name in names:
        vals = [scores[lab][name] for lab in FOLDS]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
    default = TeachConfig()
    base = f"replay {default.replay_share} / {default.steps} steps / lr {default.lr:g}"
    choice = {}
    for lab in FOLDS:
        others = [o for o in FOLDS if o != lab]
        best = max(names, key=lambda n: np.mean([scores[o][n] for o in others]))
        choice[lab] = {
            "chosen on other folds": best,
            "held-out score": round(scores[lab][best], 4),
            "default": round(scores[lab].get(base, float("nan")), 4),
        }
        print(lab, choice[lab])
    if args.json:
        args.json.write_text(json.dumps({"scores": scores, "choice": choice}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
