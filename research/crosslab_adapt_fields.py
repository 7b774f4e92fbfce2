"""Held-out BCCD's whole fields, found and classified end to end, with and without --adapt (#12).

    python -m research.crosslab_adapt_fields outputs/lolo8c outputs/lolo8c-s1

The BCCD fold models (never trained on BCCD; one per root, seeds) make one
ensemble that runs `napari-wbc evaluate bccd/wbc.csv` as a user would:
every field's white cells detected and classified, the folder's scale
measured; with ``adapt`` the model is adapted once, without labels, to the
cells of all 364 fields (a field alone holds one or two). Macro-F1 of the
matched cells over BCCD's classes.

``--fov-scale k``: the ensemble classifies at k x its training field of
view (an ensemble file's ``fov_scale``); for a transfer figure, k must be
chosen on another lab (LISC chose 0.78, docs/crosslab/test-time-zoom.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.bench_crosslab import Rows, fold_ensemble, metric_row

from napari_wbc.pipeline import ClassifyConfig
from napari_wbc.progress import run
from napari_wbc.settings import data_root
from napari_wbc.smears import iter_evaluate_smears, load_boxes
from napari_wbc.threads import configure_threads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--fov-scale", type=float, default=1.0)
    args = p.parse_args(argv)
    configure_threads(2)
    ensemble = fold_ensemble(args.roots, "bccd", fov_scale=args.fov_scale)
    boxes = load_boxes(data_root() / "bccd" / "wbc.csv")
    rows = Rows(args.json)
    for adapt in (False, "prototypes"):
        t = time.perf_counter()
        m = run(iter_evaluate_smears(boxes, ensemble, ClassifyConfig(adapt=adapt)))
        row = metric_row(m, fov_scale=args.fov_scale, adapt=adapt or "none")
        row["detection_f1"] = round(m["detection"]["f1"], 3)
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
