"""Leave-one-lab-out through the product's own path, with and without label-free adaptation (#12).

    python -m research.crosslab_adapt_product outputs/lolo8c outputs/lolo8c-s1

The fold models of each held-out lab (one per root: seeds) make one
ensemble, as the built-in models are ensembles. It classifies the held-out
lab's crops as ``napari-wbc evaluate`` does (files read, scale measured,
stain fitted, doubt-gated D4), with ``adapt`` off, ``"prototypes"`` and
``"adabn"``; and PBC's validation split, a lab it was trained on, off and
with prototypes. BCCD's cells are cut from their fields at twice the field
of view (as benchmarks/bench_gate.py does). No label of a held-out lab is
read except to score.

With ``--classes 5-part`` every row answers with the 5-part count panel
(napari_wbc.panels); PBC's validation split is then scored on its cells of
those five classes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_crosslab import Rows, fold_ensemble, metric_row
from benchmarks.bench_gate import lab_sets

from napari_wbc.panels import panel_classes
from napari_wbc.prediction import evaluate
from napari_wbc.threads import configure_threads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--classes", default=None, help="a count panel (napari_wbc.panels)")
    args = p.parse_args(argv)
    configure_threads(2)
    tmp = tempfile.TemporaryDirectory()
    sets = lab_sets(0, Path(tmp.name))
    names = {"lisc": "LISC", "bccd": "BCCD"}
    rows = Rows(args.json)
    for lab in ("bccd", "lisc"):
        ensemble = fold_ensemble(args.roots, lab)
        plan = [(names[lab], a) for a in (False, "prototypes", "adabn")]
        plan += [("PBC validation", a) for a in (False, "prototypes")]
        for test, adapt in plan:
            table = sets[test][["path", "label"]]
            panel = panel_classes(args.classes, ensemble.classes)
            if panel is not None:
                table = table[table["label"].isin(panel)]
            m = evaluate(ensemble, table, adapt=adapt, classes=panel)
            row = metric_row(
                m, fold=lab, test=test, classes=args.classes or "all", adapt=adapt or "none"
            )
            rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
