"""How many cells label-free adaptation (AdaBN) needs: macro-F1 against the cells adapted on.

    python benchmarks/bench_adapt_cells.py outputs/crosslab96e80 [--threads 2]

For each leave-one-lab-out fold model ``<root>/<aug>-<lab>/model.safetensors``
(trained without ``<lab>``), the model is adapted on seeded random samples of
``n`` of the held-out lab's cells (5 samples per ``n``) and scored on all of
them, against the model as it is. This is what :data:`napari_wbc.adapt.MIN_CELLS`
rests on: below it the statistics describe the few cells at hand, not the
lab, and the score scatters or collapses. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from bench_crosslab import probabilities, score, to_input

from napari_wbc.adapt import adapt_batchnorm
from napari_wbc.datasets import cached_lab_crops
from napari_wbc.models.files import load_network

SIZES = (8, 16, 32, 64, 128, 256)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path("outputs/crosslab/cache")
    print("| held-out lab | cells adapted on | macro-F1 mean | min | max |")
    print("|---|---:|---:|---:|---:|")
    for model_file in sorted(args.root.glob("*-*/model.safetensors")):
        model, config = load_network(model_file, cache=False)
        lab = config.training.get("holdout")
        if lab not in ("lisc", "bccd", "pbc"):
            continue
        classes = tuple(config.spec.classes)
        table, crops = cached_lab_crops(lab, cache, 128, round(config.spec.fov_rbc, 2))
        labels = table["label"].tolist()
        x = to_input(crops, config)
        base = score(probabilities(model, x), labels, classes)["macro_f1"]
        print(f"| {lab} | 0 (as it is) | {base:.3f} | | |")
        for n in [*SIZES, len(x)]:
            if n > len(x):
                continue
            scores = []
            for r in range(args.repeats if n < len(x) else 1):
                pick = np.random.default_rng([n, r]).choice(len(x), n, replace=False)
                adapted = adapt_batchnorm(model, x[torch.from_numpy(pick)], min_cells=2)
                scores.append(score(probabilities(adapted, x), labels, classes)["macro_f1"])
            print(
                f"| {lab} | {n} | {np.mean(scores):.3f} | {min(scores):.3f} | {max(scores):.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
