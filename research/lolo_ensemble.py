"""Leave one lab out: fold models of several runs alone and as one ensemble (issue #32)

    python -m research.lolo_ensemble outputs/crosslab2 outputs/crosslab2-lite1 \\
        --default outputs/crosslab2/default/wbc-lite.safetensors \\
                  outputs/crosslab2-lite1/default/wbc-lite1.safetensors \\
        --json docs/crosslab/lolo-ensemble.json

Each root holds ``in-<lab>/model.safetensors`` (``scripts/run_crosslab_lolo.sh``).
Every fold model scores every cell of the lab it never read, cut at its own
field of view, with the eight D4 views (as ``benchmarks/bench_crosslab.py``);
the ensemble is the mean of the members' probabilities (equal weights, as the
ensemble files of the product). BCCD is scored on its four classes with more
than two cells. ``--default``: models trained on all four labs, scored alone
and together on PBC's validation split (20 % per class, seed 0; 8 classes).
Nothing is chosen here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_crosslab import probabilities, to_input

from napari_wbc.crosslab import pbc_split
from napari_wbc.datasets import cached_lab_crops
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.files import load_network

CACHE = Path("outputs/crosslab/cache")
FOLDS = ("raabin", "lisc", "bccd")


def macro_f1(prob, labels, classes, present) -> float:
    m = classification_metrics(labels, [classes[i] for i in prob.argmax(1)], classes)
    return round(float(np.mean([m["per_class"][c]["f1"] for c in present])), 4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="*")
    p.add_argument("--default", type=Path, nargs="*", default=[])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict[str, dict] = {}
    for lab in FOLDS if args.roots else ():
        probs, row = [], {}
        for root in args.roots:
            model, config = load_network(root / f"in-{lab}" / "model.safetensors", cache=False)
            classes = tuple(config.spec.classes)
            table, crops = cached_lab_crops(lab, CACHE, 128, round(config.spec.fov_rbc, 2))
            labels = table["label"].tolist()
            present = [c for c in classes if labels.count(c) > 2]
            probs.append(probabilities(model, to_input(crops, config), tta=True))
            row[f"{root.name} ({config.spec.arch})"] = macro_f1(
                probs[-1], labels, classes, present
            )
        row["ensemble"] = macro_f1(np.mean(probs, axis=0), labels, classes, present)
        out[f"{lab} (held out)"] = row
        print(lab, row, flush=True)
    if args.default:
        probs, row = [], {}
        for file in args.default:
            model, config = load_network(file, cache=False)
            classes = tuple(config.spec.classes)
            table, crops = cached_lab_crops(
                "pbc", CACHE, 128, round(config.spec.fov_rbc, 2), classes
            )
            _, va = pbc_split(table)
            labels = table["label"].iloc[va].tolist()
            probs.append(probabilities(model, to_input(crops[va], config), tta=True))
            row[
                f"{file.parent.parent.name}/{file.parent.name}/{file.name} ({config.spec.arch})"
            ] = macro_f1(probs[-1], labels, classes, classes)
        row["ensemble"] = macro_f1(np.mean(probs, axis=0), labels, classes, classes)
        out["pbc validation (8 classes)"] = row
        print("pbc validation", row, flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
