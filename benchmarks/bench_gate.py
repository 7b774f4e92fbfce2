"""Doubt-gated test-time augmentation against every view of every member (issue #15).

    python benchmarks/bench_gate.py [--model auto] [--per-class 50] [--threads 2]

``--per-class 0`` takes every crop of each set (PBC's 2,551 validation
crops, LISC's 1,218, BCCD's 355 typed cells).

For each lab's crops (PBC validation, 8 classes, never trained on by either
built-in model; LISC; BCCD's typed cells), ``napari_wbc.prediction.evaluate``
runs twice in the same process, side by side: the default (a cell the first
view of every member would not flag for review is settled there; the others
get the remaining D4 views) and ``exhaustive=True`` (8 views × every member).
BCCD's cells are cut from their fields at twice the field of view. Crops are
read by the product's own path (scale measured, routed by ``--model auto``)
in both runs; the table gives seconds, cells/s, forward passes per crop,
macro-F1 of each, and their difference.

Then ``napari-wbc evaluate`` as a user runs it (a fresh process, import
included) on the PBC crops, default and ``--exhaustive``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

from napari_wbc.datasets import (
    balanced_subset,
    load_lab_table,
    read_lab_crops,
    stratified_split,
)
from napari_wbc.models.registry import PBC_CLASSES
from napari_wbc.prediction import evaluate
from napari_wbc.routing import load_model
from napari_wbc.threads import configure_threads


def lab_sets(per_class: int, folder: Path) -> dict:
    """Crop tables per lab; BCCD's cells are cut from their fields into ``folder``."""
    pbc = load_lab_table("pbc", classes=PBC_CLASSES)
    _, validation = stratified_split(pbc["label"].tolist(), 0.2, seed=0)

    def subset(table):
        if per_class <= 0:  # every crop
            return table.reset_index(drop=True)
        return balanced_subset(table, per_class=per_class, seed=7)

    bccd = subset(load_lab_table("bccd"))
    # BCCD holds whole fields with boxes: each cell cut at 2 × the model's
    # field of view (its scale then measured from the crops, as for any set).
    crops = read_lab_crops(bccd, size=256, fov_rbc=9.6)
    paths = []
    for i, crop in enumerate(crops):
        paths.append(str(folder / f"bccd-{i:04d}.png"))
        Image.fromarray(crop).save(paths[-1])
    return {
        "PBC validation": subset(pbc.iloc[validation]),
        "LISC": subset(load_lab_table("lisc")),
        "BCCD": pd.DataFrame({"path": paths, "label": bccd["label"].to_numpy()}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="auto")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tta", default="d4")
    p.add_argument("--no-cli", action="store_true", help="skip the fresh-process CLI rows")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    configure_threads(args.threads)
    model = load_model(args.model)
    rows = []
    tmp = tempfile.TemporaryDirectory()
    sets = lab_sets(args.per_class, Path(tmp.name))
    for lab, table in sets.items():
        table = table[["path", "label"]].reset_index(drop=True)
        row = {"set": lab, "n": len(table)}
        for name, exhaustive in (("exhaustive", True), ("gated", False)):
            t = time.perf_counter()
            m = evaluate(model, table, tta=args.tta, exhaustive=exhaustive)
            seconds = time.perf_counter() - t
            row[name] = {
                "seconds": round(seconds, 1),
                "cells_per_s": round(len(table) / seconds, 1),
                "passes": m["passes_per_crop"],
                "macro_f1": round(float(m["macro_f1"]), 4),
                "model": m["model"],
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    cli_rows = []
    if not args.no_cli:
        # As the issue measured it: 50 PBC validation crops per class.
        pbc = balanced_subset(sets["PBC validation"], per_class=50, seed=7)[["path", "label"]]
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "pbc.csv"
            pbc.to_csv(csv, index=False)
            for flag in ([], ["--exhaustive"]):
                cmd = ["napari-wbc", "evaluate", str(csv), "--model", args.model, "-q"]
                cmd += ["--threads", str(args.threads), "--json", *flag]
                t = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                seconds = time.perf_counter() - t
                m = json.loads(out.stdout)
                cli_rows.append(
                    {
                        "run": " ".join(["napari-wbc evaluate", *flag]),
                        "n": len(pbc),
                        "seconds": round(seconds, 1),
                        "cells_per_s": round(len(pbc) / seconds, 1),
                        "macro_f1": round(float(m["macro_f1"]), 4),
                    }
                )
                print(json.dumps(cli_rows[-1]), flush=True)

    print(
        "\n| crops | n | model | exhaustive: s, cells/s, passes, macro-F1 | "
        "gated: s, cells/s, passes, macro-F1 | speed-up | ΔF1 |"
    )
    print("|---|---:|---|---|---|---:|---:|")
    for r in rows:
        e, g = r["exhaustive"], r["gated"]
        print(
            f"| {r['set']} | {r['n']} | {g['model']} | {e['seconds']}, {e['cells_per_s']}, "
            f"{e['passes']}, {e['macro_f1']:.4f} | {g['seconds']}, {g['cells_per_s']}, "
            f"{g['passes']}, {g['macro_f1']:.4f} | {e['seconds'] / g['seconds']:.2f}× | "
            f"{g['macro_f1'] - e['macro_f1']:+.4f} |"
        )
    if cli_rows:
        print("\n| command (fresh process, import included) | crops | s | cells/s | macro-F1 |")
        print("|---|---:|---:|---:|---:|")
        for r in cli_rows:
            print(
                f"| `{r['run']}` | {r['n']} | {r['seconds']} | {r['cells_per_s']} | "
                f"{r['macro_f1']:.4f} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"sets": rows, "cli": cli_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
