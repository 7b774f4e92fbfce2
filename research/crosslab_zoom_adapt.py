"""Leave one lab out: test-time zoom, prototype adaptation and the 5-part panel together (#12).

    python -m research.crosslab_zoom_adapt outputs/lolo8c outputs/lolo8c-s1

The two seeds' fold models of each held-out lab make one ensemble (as in
research/crosslab_adapt_product.py) and classify its cells through
``evaluate``'s path (scale measured, stain fitted, doubt-gated D4), with the
measured scale multiplied by k before the crops are cut. k is the one the
*other* held-out lab preferred (docs/crosslab/test-time-zoom.md: LISC chose
0.78, BCCD 0.85), and 1.0 for reference. Each with and without prototype
adaptation (``--methods``), over all eight classes and the 5-part panel
(``--panels``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_crosslab import Rows, fold_ensemble, metric_row
from benchmarks.bench_gate import lab_sets

from napari_wbc.prediction import evaluate
from napari_wbc.threads import configure_threads

#: k chosen on the other held-out lab.
OTHER_LABS_K = {"lisc": 0.85, "bccd": 0.78}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--quick",
        action="store_true",
        help="only the other lab's k and all eight classes (with and without adaptation)",
    )
    p.add_argument(
        "--labs",
        nargs="+",
        choices=("bccd", "lisc"),
        default=("bccd", "lisc"),
        help="the held-out labs to score (default both)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=("none", "prototypes"),
        help="adaptations to score ('none': as the models are)",
    )
    p.add_argument(
        "--panels",
        nargs="+",
        default=("all", "5-part"),
        help="count panels to answer with ('all': every class)",
    )
    args = p.parse_args(argv)
    configure_threads(2)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    names = {"lisc": "LISC", "bccd": "BCCD"}
    rows = Rows(args.json)
    for lab in args.labs:
        ensemble = fold_ensemble(args.roots, lab)
        table = sets[names[lab]][["path", "label"]]
        found = ensemble.preprocessor.resolve_crop_scale(
            table["path"].astype(str).tolist(), "measure"
        )
        factors = (OTHER_LABS_K[lab],) if args.quick else (1.0, OTHER_LABS_K[lab])
        for k in factors:
            panels = ("all",) if args.quick else args.panels
            for classes in [None if c == "all" else c for c in panels]:
                for adapt in [False if m == "none" else m for m in args.methods]:
                    m = evaluate(
                        ensemble,
                        table,
                        scale=found.rbc_diameter_px * k,
                        adapt=adapt,
                        classes=classes,
                    )
                    row = metric_row(
                        m, fold=lab, k=k, classes=classes or "all", adapt=adapt or "none"
                    )
                    rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
