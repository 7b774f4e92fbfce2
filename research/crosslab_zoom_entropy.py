"""Can a source choose its own field of view without labels? Entropy against macro-F1 per k (#12).

    python -m research.crosslab_zoom_entropy outputs/lolo8c outputs/lolo8c-s1

For each held-out lab, the two seeds' fold models (one ensemble) classify
its cells through ``evaluate``'s path at several test-time fields of view
(``fov_scale`` k). Printed per k: the mean prediction entropy and mean
confidence, which need no label, and macro-F1, which does. If the k of
least entropy were the k of best macro-F1 on both labs, a source could pick
its own field of view; this checks whether it is.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchmarks.bench_crosslab import Rows, fold_ensemble
from benchmarks.bench_gate import lab_sets

from napari_wbc.metrics import classification_metrics
from napari_wbc.prediction import iter_predict_crop_files
from napari_wbc.progress import run
from napari_wbc.threads import configure_threads

FACTORS = (0.7, 0.78, 0.85, 0.92, 1.0, 1.18)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    configure_threads(2)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    names = {"lisc": "LISC", "bccd": "BCCD"}
    rows = Rows(args.json)
    for lab in ("bccd", "lisc"):
        base = fold_ensemble(args.roots, lab)
        table = sets[names[lab]]
        paths = table["path"].astype(str).tolist()
        labels = table["label"].tolist()
        found = base.preprocessor.resolve_crop_scale(paths, "measure")
        for k in FACTORS:
            out = run(iter_predict_crop_files(base, paths, scale=found.rbc_diameter_px * k))
            probs = np.clip(out["probs"], 1e-12, 1)
            entropy = float(np.mean(-(probs * np.log(probs)).sum(1)))
            m = classification_metrics(labels, out["pred"], out["classes"])
            row = {
                "lab": lab,
                "k": k,
                "entropy": round(entropy, 4),
                "confidence": round(float(np.mean(out["confidence"])), 4),
                "macro_f1": round(float(m["macro_f1"]), 4),
            }
            rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
