"""Which resampling brings crops to the model's field of view best? (issue #12, 2x row)

    python -m research.resample_study -o outputs/s8/resample

Chosen on PBC crops that are neither in the PBC specialist's training subset
(up to 1,000 per class, seed 0) nor in the validation split the results
report (20 % per class, seed 0): six classes are left (basophils and
lymphocytes were all used). Each crop is rescaled to 1x, 0.5x and 2x its
field of view (benchmarks/bench_crosslab.py ``rescaled_pbc``), its scale
measured, and scored by the specialist (no TTA) with each filter of
``napari_wbc.crop_scale.to_field_of_view``.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from pathlib import Path

import pandas as pd
from benchmarks.bench_crosslab import rescaled_pbc
from PIL import Image

import napari_wbc.crop_scale as crop_scale
from napari_wbc.datasets import (
    balanced_subset,
    load_lab_table,
    load_labelled_crops,
    stratified_split,
)
from napari_wbc.inference import load_any
from napari_wbc.models.files import builtin_model_path
from napari_wbc.models.registry import PBC_CLASSES
from napari_wbc.prediction import evaluate
from napari_wbc.threads import configure_threads


def dev_set(per_class: int) -> pd.DataFrame:
    pbc = load_lab_table("pbc", classes=PBC_CLASSES)
    _, val = stratified_split(pbc["label"].tolist(), 0.2, seed=0)
    reported = set(pbc.iloc[val]["path"].astype(str))
    crops = load_labelled_crops(Path(pbc["path"].iloc[0]).parents[1])
    trained = set(balanced_subset(crops, per_class=1000, seed=0)["path"].astype(str))
    rest = pbc[~pbc["path"].astype(str).isin(reported | trained)]
    return balanced_subset(rest, per_class=per_class, seed=1).reset_index(drop=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--filters", nargs="*", default=["BILINEAR", "BICUBIC", "LANCZOS"])
    p.add_argument(
        "--input-resize",
        default=None,
        help="also set the network input step's mode (napari_wbc.passes.INPUT_RESIZE)",
    )
    args = p.parse_args(argv)
    configure_threads(2)
    if args.input_resize:
        import napari_wbc.passes as passes

        passes.INPUT_RESIZE = args.input_resize
    table = dev_set(args.per_class)
    print("dev set:", table["label"].value_counts().to_dict(), flush=True)
    model = load_any(builtin_model_path("wbc-pbc"))
    rows = []
    plain = crop_scale.to_field_of_view
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1.0, 0.5, 2.0):
            folder = Path(tmp) / str(factor)
            folder.mkdir()
            paths = []
            for i, crop in enumerate(rescaled_pbc(table["path"], factor)):
                paths.append(str(folder / f"{i:05d}.png"))
                Image.fromarray(crop).save(paths[-1])
            data = pd.DataFrame({"path": paths, "label": table["label"]})
            for name in args.filters:
                crop_scale.to_field_of_view = functools.partial(plain, resample=name)
                try:
                    m = evaluate(model, data, tta="none", scale="measure")
                finally:
                    crop_scale.to_field_of_view = plain
                rows.append(
                    {
                        "factor": factor,
                        "filter": name,
                        "input_resize": args.input_resize or "bilinear",
                        "macro_f1": round(m["macro_f1"], 4),
                        "rbc_px": m.get("crop_scale", {}).get("rbc_diameter_px")
                        if isinstance(m.get("crop_scale"), dict)
                        else None,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    name = f"resample-{args.input_resize}.json" if args.input_resize else "resample.json"
    (args.output / name).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
