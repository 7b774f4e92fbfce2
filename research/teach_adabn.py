"""Teach on batch-norm statistics re-estimated on the lab: does AdaBN before teaching help? (#33)

    python -m research.teach_adabn outputs/crosslab2 --json docs/crosslab/teach-adabn.json

The protocol of ``benchmarks/bench_teach.py`` (a fold model, ``--cells`` taught cells a
class drawn with seeds ``0..--seeds-1``, the rest of the held-out lab scored with D4), with
one change: before teaching, every batch-norm layer's statistics are re-estimated on the
held-out lab's cells (:func:`napari_wbc.adapt.adapt_ensemble` with ``method="adabn"``,
label-free, class-balanced by its own predictions). The taught and scored cells are read
through the adapted network; the replayed training-lab statistics stay those of the
unadapted one (each lab normalised by its own statistics, AdaBN's premise). Untaught
(``0``) rows give AdaBN alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_teach import ensemble_probs, held_out_cells, replay_stats, view_features

from napari_wbc.adapt import adapt_ensemble
from napari_wbc.metrics import classification_metrics
from napari_wbc.teach import teach


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, nargs="+")
    p.add_argument("--labs", nargs="+", default=["raabin", "lisc", "bccd"])
    p.add_argument("--cells", nargs="+", type=int, default=[0, 5])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {}
    for lab in args.labs:
        files = [root / f"in-{lab}" / "model.safetensors" for root in args.root]
        ensemble, fov, _, crops, labels, y, scored = held_out_cells(files, lab)
        classes = tuple(ensemble.classes)
        stats = replay_stats(ensemble, lab, classes, fov)
        adapted = adapt_ensemble(ensemble, crops, method="adabn")
        feats = view_features(adapted, crops)
        out[lab] = {}
        for n in args.cells:
            scores = []
            for seed in range(args.seeds if n else 1):
                rng = np.random.default_rng([seed, n])
                taught = np.concatenate(
                    [
                        rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
                        for c in scored
                    ]
                    if n
                    else [np.zeros(0, int)]
                )
                model = adapted
                if n:
                    model = teach(adapted, crops[taught], labels[taught], replay=stats)
                rest = np.setdiff1d(np.arange(len(y)), taught)
                probs = ensemble_probs(model, feats, rest)
                met = classification_metrics(y[rest], probs.argmax(1), classes)
                scores.append(float(np.mean([met["per_class"][c]["f1"] for c in scored])))
            out[lab][n] = scores
            print(
                f"{lab} {n:>2} per class, AdaBN first: {np.mean(scores):.3f} {scores}", flush=True
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
