"""PBC validation crops at other magnifications, through the product's own path (issue #12).

    python benchmarks/bench_pbc_scale.py [--model wbc-lite --model wbc-pbc] [--tta none]

PBC's validation split (20 % per class, seed 0, of the 8-class table; never
trained on by either built-in model) is cut to 0.5×, 0.7×, 1.4× and 2× its
field of view and resized back to the original pixel count, so a cell's size
in pixels changes by 1/factor (benchmarks/bench_crosslab.py ``rescaled_pbc``).
Each set is written to a temporary folder and scored by
``napari_wbc.prediction.evaluate`` with the scale **measured** from the crops
(``scale="measure"``), as ``napari-wbc evaluate`` does by default. Prints a
table of macro-F1 per model and factor, and the measured red-cell size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_crosslab import rescaled_pbc
from PIL import Image

from napari_wbc.datasets import load_lab_table, stratified_split
from napari_wbc.models.registry import PBC_CLASSES
from napari_wbc.prediction import evaluate
from napari_wbc.threads import configure_threads

FACTORS = (1.0, 0.5, 0.7, 1.4, 2.0)


def pbc_validation() -> pd.DataFrame:
    table = load_lab_table("pbc", classes=PBC_CLASSES)
    _, va = stratified_split(table["label"].tolist(), 0.2, seed=0)
    return table.iloc[va][["path", "label"]].reset_index(drop=True)


def write_rescaled(table: pd.DataFrame, factor: float, folder: Path) -> pd.DataFrame:
    """The crops at ``factor`` × their field of view, as PNG files in ``folder`` (kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:05d}.png" for i in range(len(table))]
    todo = [i for i, path in enumerate(paths) if not path.is_file()]
    if todo:
        crops = rescaled_pbc(table["path"].iloc[todo].tolist(), factor)
        for i, crop in zip(todo, crops, strict=True):
            Image.fromarray(crop).save(paths[i])
    return pd.DataFrame({"path": [str(p) for p in paths], "label": table["label"].to_numpy()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model name or file (repeatable)")
    p.add_argument("--tta", default="none")
    p.add_argument("--factors", default=",".join(str(f) for f in FACTORS))
    p.add_argument("--limit", type=int, default=0, help="first N crops per class (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--sets",
        type=Path,
        default=None,
        help="keep the rescaled crops here (reused by later runs; default: a temporary folder)",
    )
    args = p.parse_args(argv)
    configure_threads(args.threads)
    models = args.model or ["wbc-lite", "wbc-pbc"]
    factors = [float(f) for f in args.factors.split(",")]
    table = pbc_validation()
    if args.limit:
        table = table.groupby("label", group_keys=False).head(args.limit).reset_index(drop=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        where = args.sets or Path(tmp)
        tag = f"n{len(table)}"
        sets = {f: write_rescaled(table, f, where / f"{tag}-x{f}") for f in factors}
        for model in models:
            for f in factors:
                t = time.perf_counter()
                m = evaluate(model, sets[f], tta=args.tta, scale="measure")
                found = m.get("crop_scale") or {}
                rows.append(
                    {
                        "model": model,
                        "factor": f,
                        "n": m["n"],
                        "macro_f1": round(float(m["macro_f1"]), 4),
                        "rbc_px": round(float(found.get("rbc_diameter_px", np.nan)), 1),
                        "chosen": (m.get("route") or {}).get("model", ""),
                        "ood_share": (m.get("route") or {}).get("specialist_ood_share"),
                        "seconds": round(time.perf_counter() - t, 1),
                    }
                )
                print(rows[-1], flush=True)
    print(
        f"\n| model | factor | crops | red cell (px, measured) | chosen (auto) "
        f"| macro-F1 (TTA {args.tta}) |"
    )
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        chosen = f"{r['chosen']} ({r['ood_share']:.0%} unlike)" if r["chosen"] else ""
        print(
            f"| {r['model']} | {r['factor']} | {r['n']} | {r['rbc_px']} | {chosen} "
            f"| {r['macro_f1']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
