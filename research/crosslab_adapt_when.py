"""Would "adapt when the model finds the cells unlike its training cells" pick the held-out labs? (#12)

    python -m research.crosslab_adapt_when outputs/lolo8c outputs/lolo8c-s1

For each held-out lab, the fold models of all roots (seeds) make one
ensemble. Its trust statistics are fitted as the built-in model's are
(scripts/fit_trust.py ``--split crosslab``) but only on the labs it was
trained on: feature centres on a seeded sample of their training cells,
the out-of-distribution threshold (99th percentile) on PBC's validation
cells. Then, as the model choice does, 64 cells evenly spread over each
set are classified without TTA and the share beyond the threshold is
printed: for the held-out lab (never seen), for PBC's validation split and
for the other lab (both trained on). The image warning's 30 % is the line.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from benchmarks.bench_crosslab import Rows, fold_ensemble
from benchmarks.bench_gate import lab_sets
from scripts.fit_trust import model_crops

from napari_wbc.datasets import balanced_subset, load_lab_table, stratified_split
from napari_wbc.features import member_outputs
from napari_wbc.gate import iter_predict_sums
from napari_wbc.passes import combine
from napari_wbc.progress import run
from napari_wbc.threads import configure_threads
from napari_wbc.trust import IMAGE_OOD_SHARE, fit_trust_stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    configure_threads(2)
    tmp = tempfile.TemporaryDirectory()
    sets = lab_sets(0, Path(tmp.name))
    names = {"lisc": "LISC", "bccd": "BCCD"}
    rows = Rows(args.json)
    for lab, other in (("bccd", "lisc"), ("lisc", "bccd")):
        ens = fold_ensemble(args.roots, lab)
        index = {c: i for i, c in enumerate(ens.classes)}
        pbc = load_lab_table("pbc", classes=ens.classes)
        tr, va = stratified_split(pbc["label"].tolist(), 0.2, seed=0)
        train = pd.concat(
            [
                balanced_subset(pbc.iloc[tr], per_class=args.per_class, seed=1),
                balanced_subset(load_lab_table(other), per_class=args.per_class // 2, seed=1),
            ],
            ignore_index=True,
        )
        val = balanced_subset(pbc.iloc[va], per_class=args.per_class, seed=2)
        fit = member_outputs(ens, model_crops(ens, train))
        check = member_outputs(ens, model_crops(ens, val))
        ens.trust = fit_trust_stats(
            fit["logits"],
            fit["features"],
            np.array([index[v] for v in train["label"]]),
            check["logits"],
            check["features"],
            np.array([index[v] for v in val["label"]]),
            ens.weights,
        )
        for test in (names[lab], "PBC validation", names[other]):
            paths = sets[test]["path"].tolist()
            sample = [paths[i] for i in np.linspace(0, len(paths) - 1, 64).astype(int)]
            found = ens.preprocessor.resolve_crop_scale(paths, "auto")
            rbc = None if found is None else found.rbc_diameter_px
            crops = run(ens.preprocessor.iter_read_crop_files(sample, "auto", rbc))
            sums = run(iter_predict_sums(ens, crops, tta="none"))
            out = combine(ens, sums.sums, sums.views)
            share = float(np.mean(out["ood_distance"] > ens.trust.ood_threshold))
            row = {
                "fold": lab,
                "set": test,
                "seen in training": test != names[lab],
                "ood_share": round(share, 3),
                "adapt by the rule": share > IMAGE_OOD_SHARE,
            }
            rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
