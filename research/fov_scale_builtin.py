"""The built-in three-lab model (``wbc-lite``) at several test-time fields of view (#12).

    python -m research.fov_scale_builtin 1.0 0.85

Leave one lab out, the fold models of ``wbc-lite``'s recipe classified both
held-out labs better with cells cut at a tighter field of view than they
were trained at (docs/crosslab/test-time-zoom.md: LISC preferred 0.78,
BCCD 0.85). This measures what the same change costs or gains on the
built-in model itself, through ``evaluate``'s path (scale measured, stain
fitted, doubt-gated D4): PBC's validation split (never trained on), and
LISC's and BCCD's cells (trained on: in-lab figures, to show nothing
breaks). Nothing here is used to choose the factor; that was chosen on the
leave-one-lab-out benchmark. ``--methods`` also scores each set adapted to
its own cells (what adaptation costs on labs the model was trained on).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from benchmarks.bench_crosslab import Rows, metric_row
from benchmarks.bench_gate import lab_sets

from napari_wbc.prediction import evaluate
from napari_wbc.routing import load_model
from napari_wbc.threads import configure_threads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("factors", type=float, nargs="+")
    p.add_argument("--model", default="wbc-lite")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--methods",
        nargs="+",
        default=("none",),
        help="adaptations to score each set with ('none': as the model is)",
    )
    args = p.parse_args(argv)
    configure_threads(2)
    base = load_model(args.model)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    rows = Rows(args.json)
    for factor in args.factors:
        ensemble = dataclasses.replace(base, fov_scale=factor)
        for test, table in sets.items():
            for method in args.methods:
                adapt = False if method == "none" else method
                m = evaluate(ensemble, table[["path", "label"]], adapt=adapt)
                row = metric_row(m, model=args.model, fov_scale=factor, test=test, adapt=method)
                rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
