"""Test-time field of view and input size of the fold models, chosen without the held-out lab (issue #32)

    python -m research.tta_probe outputs/crosslab2 --json docs/crosslab/tta-probe.json

Each fold model ``<root>/in-<lab>/model.safetensors`` (trained at 96 px on
crops of 3.2 red-cell diameters, with a wide zoom jitter) is scored with D4 (``--no-d4``: one view) on
its held-out lab's cells cut at several fields of view (``--fov``) and fed at
several input sizes (``--size``), and on the mean of the probabilities over
every field of view ("multi-scale").

The choice for fold X uses only the other folds' held-out scores (a setting
is picked by its mean macro-F1 on the two other held-out labs); X's own score
under each setting is reported apart and never used to choose. Raabin is
capped at ``--per-class`` cells per class to keep the probe short.
Results: docs/log/accuracy.md (2026-12-07, test-time scale).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_crosslab import probabilities, to_input

from napari_wbc.datasets import cached_lab_crops
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.files import load_network

CACHE = Path("outputs/crosslab/cache")
FOLDS = ("raabin", "lisc", "bccd")


def macro_f1(prob, labels, classes, present):
    pred = [classes[i] for i in prob.argmax(1)]
    m = classification_metrics(labels, pred, classes)
    return float(np.mean([m["per_class"][c]["f1"] for c in present]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--fov", type=float, nargs="+", default=[2.6, 3.2, 4.0])
    p.add_argument("--size", type=int, nargs="+", default=[96, 112, 128])
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--no-d4", action="store_true", help="one view per crop (8× faster)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scores: dict[str, dict[str, float]] = {}
    for lab in FOLDS:
        model, config = load_network(args.root / f"in-{lab}" / "model.safetensors", cache=False)
        classes = tuple(config.spec.classes)
        probs = {}
        keep = None
        for fov in args.fov:
            table, crops = cached_lab_crops(lab, CACHE, 128, fov)
            if keep is None:
                rng = np.random.default_rng(0)
                keep = np.sort(
                    np.concatenate(
                        [
                            rng.permutation(np.flatnonzero(table["label"].values == c))[
                                : args.per_class
                            ]
                            for c in sorted(set(table["label"]))
                        ]
                    )
                )
                labels = table["label"].iloc[keep].tolist()
                # BCCD's 2 basophils: scored on its four classes with > 2 cells.
                present = [c for c in classes if labels.count(c) > 2]
            for size in args.size:
                cfg = _with_size(config, size)
                probs[(fov, size)] = probabilities(
                    model, to_input(crops[keep], cfg), tta=not args.no_d4
                )
                print(
                    lab,
                    fov,
                    size,
                    round(macro_f1(probs[(fov, size)], labels, classes, present), 4),
                    flush=True,
                )
        row = {
            f"fov {f} / {s} px": macro_f1(pr, labels, classes, present)
            for (f, s), pr in probs.items()
        }
        for size in args.size:
            mean = np.mean([probs[(f, size)] for f in args.fov], axis=0)
            row[f"multi-scale / {size} px"] = macro_f1(mean, labels, classes, present)
        for a, b in itertools.combinations(args.fov, 2):
            for size in args.size:
                mean = (probs[(a, size)] + probs[(b, size)]) / 2
                row[f"fov {a}+{b} / {size} px"] = macro_f1(mean, labels, classes, present)
        scores[lab] = row
    settings = list(scores[FOLDS[0]])
    print("| setting | " + " | ".join(FOLDS) + " | mean |")
    print("|---|" + "---:|" * (len(FOLDS) + 1))
    for s in settings:
        vals = [scores[lab][s] for lab in FOLDS]
        print(f"| {s} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.mean(vals):.3f} |")
    choice = {}
    for lab in FOLDS:
        others = [o for o in FOLDS if o != lab]
        best = max(settings, key=lambda s: np.mean([scores[o][s] for o in others]))
        choice[lab] = {
            "chosen on other folds": best,
            "held-out score": round(scores[lab][best], 4),
            "baseline (fov 3.2 / 96 px)": round(scores[lab]["fov 3.2 / 96 px"], 4),
        }
        print(lab, choice[lab])
    if args.json:
        out = {"scores": scores, "choice": choice, "per_class_cap": args.per_class}
        args.json.write_text(json.dumps(out, indent=1))
    return 0


def _with_size(config, size: int):
    import dataclasses

    return dataclasses.replace(config, spec=dataclasses.replace(config.spec, input_size=size))


if __name__ == "__main__":
    raise SystemExit(main())
