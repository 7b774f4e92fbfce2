"""Leave one lab out: the fold models with crops cut at k x the measured scale (issue #12).

    python -m research.crosslab_zoom 0.6 0.7 0.78 0.85 1.0 1.18

For each held-out lab (LISC: all 1,218 crops; BCCD: its 355 typed cells cut
at twice the field of view, as benchmarks/bench_gate.py does) the two fold
models that never saw it (outputs/lolo8c*, scripts/train_crosslab.py)
classify every crop through the product's path with D4, the set's scale
measured and then multiplied by k (k < 1: the crop is cut smaller, so the
cell looks larger to the model). Prints the two-model ensemble's macro-F1
per k and for the mean over every k. A k is to be chosen on one held-out
lab and reported on the other. Results: docs/crosslab/test-time-zoom.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchmarks.bench_gate import lab_sets

from napari_wbc.inference import load_any
from napari_wbc.metrics import classification_metrics
from napari_wbc.prediction import iter_predict_crop_files
from napari_wbc.progress import run
from napari_wbc.threads import configure_threads

FOLDS = {
    "LISC": [
        "outputs/lolo8c/dr-lisc/model.safetensors",
        "outputs/lolo8c-s1/dr-lisc/model.safetensors",
    ],
    "BCCD": [
        "outputs/lolo8c/dr-bccd/model.safetensors",
        "outputs/lolo8c-s1/dr-bccd/model.safetensors",
    ],
}


def main(factors: tuple[float, ...]) -> int:
    configure_threads(2)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    for lab, models in FOLDS.items():
        paths = sets[lab]["path"].astype(str).tolist()
        labels = sets[lab]["label"].tolist()
        probs: dict = {}
        classes = None
        for path in models:
            model = load_any(path)
            found = model.preprocessor.resolve_crop_scale(paths, "measure")
            for k in factors:
                scale = found.rbc_diameter_px * k
                out = run(
                    iter_predict_crop_files(model, paths, "d4", scale=scale, exhaustive=True)
                )
                probs[path, k] = out["probs"]
                classes = out["classes"]
            print(lab, path, "measured", round(found.rbc_diameter_px, 1), flush=True)

        def macro_f1(p, labels=labels, classes=classes):
            return round(classification_metrics(labels, p.argmax(1), classes)["macro_f1"], 4)

        row = {f"k={k}": macro_f1(np.mean([probs[m, k] for m in models], 0)) for k in factors}
        row["mean over k"] = macro_f1(np.mean([probs[m, k] for m in models for k in factors], 0))
        print(lab, json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(tuple(float(k) for k in sys.argv[1:]) or (0.85, 1.0, 1.18)))
