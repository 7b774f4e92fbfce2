"""Leave-one-lab-out scores of ensembles of fold models (the members averaged, as the product does).

    python benchmarks/bench_crosslab_ensemble.py outputs/lolo8c outputs/lolo8c-s1

Each root holds ``<aug>-<lab>/model.safetensors`` fold models (one seed per
root, from napari-wbc train --labs). Models of the same held-out lab are
averaged (probabilities, each over no TTA or D4) and scored on every cell of
that lab, which none of them read; each member alone is listed too. Prints a
markdown table (macro-F1 over the lab's classes; all the model's classes open).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from bench_crosslab import probabilities, score, to_input

from napari_wbc.datasets import cached_lab_crops
from napari_wbc.models.files import load_network


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folds = defaultdict(list)
    for root in args.roots:
        for file in sorted(root.glob("*-*/model.safetensors")):
            model, config = load_network(file, cache=False)
            folds[config.training.get("holdout")].append((file, model, config))
    print("| held-out lab | models | TTA | macro-F1 | balanced acc. |")
    print("|---|---|---|---:|---:|")
    for lab, members in folds.items():
        if lab not in ("lisc", "bccd", "pbc"):
            continue
        classes = tuple(members[0][2].spec.classes)
        table, crops = cached_lab_crops(lab, "outputs/crosslab/cache", 128, 4.8)
        labels = table["label"].tolist()
        for tta in (False, True):
            probs = []
            for file, model, config in members:
                probs.append(probabilities(model, to_input(crops, config), tta=tta))
                r = score(probs[-1], labels, classes)
                name = f"{file.parent.parent.name}/{file.parent.name}"
                print(
                    f"| {lab} | {name} | {'d4' if tta else 'none'} | {r['macro_f1']:.3f} | {r['balanced_accuracy']:.3f} |",
                    flush=True,
                )
            r = score(np.mean(probs, 0), labels, classes)
            print(
                f"| {lab} | **ensemble of {len(probs)}** | {'d4' if tta else 'none'} | **{r['macro_f1']:.3f}** | {r['balanced_accuracy']:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
