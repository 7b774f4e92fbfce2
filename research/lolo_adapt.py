"""Leave one lab out through ``evaluate``'s path, with and without T3A adaptation (issues #32, #33)

    python -m research.lolo_adapt outputs/crosslab2 [outputs/crosslab2-lite1 ...] \\
        --json docs/crosslab/lolo-adapt.json

The fold models ``<root>/in-<lab>/model.safetensors`` of every root (one
member each) classify their held-out lab's crop files as ``napari-wbc
evaluate`` reads them: the scale measured on the set, the stain fitted, D4
where in doubt. Each with ``adapt=False`` and with prototype adaptation
(T3A, what the default does for ``auto → wbc-lite`` sets of 128 crops or
more). BCCD's cells are cut from its fields at twice the field of view (as
``benchmarks/bench_gate.py`` does) and scored on its four classes with more
than two cells. Nothing is chosen on the lab scored.

``--three-scales``: classify every set as if its measured scale were unsure
(×0.8, ×1 and ×1.25 averaged, ``prediction.UNSURE_SCALE_FACTORS``), to see
whether always hedging the scale pays.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchmarks.bench_crosslab import Rows, metric_row
from benchmarks.bench_gate import lab_sets

from napari_wbc.datasets import load_lab_table
from napari_wbc.inference import Ensemble, EnsembleMember
from napari_wbc.models.files import load_network
from napari_wbc.prediction import evaluate
from napari_wbc.preprocess import Preprocessor
from napari_wbc.threads import configure_threads


def fold_models(roots, lab: str) -> Ensemble:
    members = []
    for root in roots:
        model, config = load_network(Path(root) / f"in-{lab}" / "model.safetensors", cache=False)
        members.append(EnsembleMember(model, config, 1.0))
    return Ensemble(members, tta="d4", name=f"fold {lab}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--labs", nargs="+", default=["raabin", "lisc", "bccd"])
    p.add_argument("--methods", nargs="+", default=["none", "prototypes"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--three-scales", action="store_true")
    args = p.parse_args(argv)
    if args.three_scales:
        measure = Preprocessor.resolve_crop_scale

        def unsure(self, *a, **k):
            found = measure(self, *a, **k)
            return None if found is None else dataclasses.replace(found, unsure=True)

        Preprocessor.resolve_crop_scale = unsure
    configure_threads(args.threads)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    tables = {"lisc": sets["LISC"], "bccd": sets["BCCD"], "raabin": load_lab_table("raabin")}
    rows = Rows(args.json)
    for lab in args.labs:
        ensemble = fold_models(args.roots, lab)
        table = tables[lab][["path", "label"]]
        counts = table["label"].value_counts()
        classes = [c for c in ensemble.classes if counts.get(c, 0) > 2]
        for method in args.methods:
            m = evaluate(ensemble, table, adapt=False if method == "none" else method)
            f1 = [m["per_class"][c]["f1"] for c in classes]
            row = metric_row(m, fold=lab, members=len(args.roots), adapt=method)
            row["roots"] = [str(r) for r in args.roots]
            row["three_scales"] = args.three_scales
            row["macro_f1_scored"] = round(float(np.mean(f1)), 4)
            row["scored_classes"] = classes
            row["crop_scale"] = m.get("crop_scale")
            rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
