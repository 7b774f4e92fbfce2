"""Measure the figures of MODEL_CARD.md for the built-in model, through the product's own path.

    python scripts/evaluate_default_model.py [--model M] [-o outputs/default/evaluation.json]

1. PBC validation split (20 % per class, seed 0, of PBC's 8-class table: the
   split ``napari-wbc train --labs`` never trains on): the ensemble and each
   member, with D4 and without test-time augmentation, crops as they are and
   with the scale measured (what ``napari-wbc evaluate`` does by default),
   plus a confusion-matrix PNG.
2. LISC and BCCD: the built-in model was trained on every labelled cell of
   both, so these are in-lab figures, listed only to show nothing is broken;
   the transfer figures are the leave-one-lab-out ones (bench_crosslab.py).
3. BCCD whole pipeline (detection + classification), scale measured.

Nothing here is used to choose anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from napari_wbc.datasets import load_lab_table, stratified_split
from napari_wbc.inference import load_any
from napari_wbc.metrics import save_confusion_png
from napari_wbc.models.files import default_model_path, read_ensemble
from napari_wbc.pipeline import ClassifyConfig
from napari_wbc.prediction import evaluate
from napari_wbc.progress import run
from napari_wbc.settings import data_root
from napari_wbc.smears import iter_evaluate_smears, load_boxes

KEYS = ("n", "accuracy", "macro_f1", "balanced_accuracy", "crop_scale")


def short(m: dict) -> dict:
    return {k: m[k] for k in KEYS if k in m}


def pbc_validation(classes):
    table = load_lab_table("pbc", classes=classes)
    _, va = stratified_split(table["label"].tolist(), 0.2, seed=0)
    return table.iloc[va][["path", "label"]].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("outputs/default/evaluation.json")
    )
    parser.add_argument(
        "--confusion", type=Path, default=Path("docs/images/confusion-default.png")
    )
    args = parser.parse_args()
    model = args.model or default_model_path()
    ensemble = load_any(model)
    out: dict = {"model": str(model)}

    validation = pbc_validation(ensemble.classes)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    validation.to_csv(args.output.parent / "pbc-validation.csv", index=False)
    t = time.perf_counter()
    full = evaluate(ensemble, validation, tta="d4", scale="as-is")
    out["pbc_seconds_ensemble_d4"] = round(time.perf_counter() - t, 1)
    save_confusion_png(full, args.confusion)
    out["pbc"] = {
        "ensemble d4": full,
        "ensemble none": short(evaluate(ensemble, validation, tta="none", scale="as-is")),
        "ensemble d4, scale measured": short(evaluate(ensemble, validation, tta="d4")),
    }
    print(json.dumps({k: short(v) for k, v in out["pbc"].items()}, indent=1), flush=True)
    if model.suffix == ".json":
        for ref in read_ensemble(model).members:
            member = Path(ref.path)
            for tta in ("none", "d4"):
                # At the ensemble's field of view, as it classifies with them.
                alone = dataclasses.replace(
                    load_any(member, tta=tta), fov_scale=ensemble.fov_scale
                )
                out["pbc"][f"{member.stem} {tta}"] = short(
                    evaluate(alone, validation, tta=tta, scale="as-is")
                )
                print(member.stem, tta, out["pbc"][f"{member.stem} {tta}"], flush=True)

    # In-lab only: these labs were trained on.
    out["in_lab"] = {}
    for lab in ("lisc",):
        table = load_lab_table(lab)
        out["in_lab"][lab] = short(evaluate(ensemble, table, tta="d4"))
        print(lab, out["in_lab"][lab], flush=True)
    boxes = load_boxes(data_root() / "bccd" / "wbc.csv")
    m = run(iter_evaluate_smears(boxes, ensemble, ClassifyConfig(tta="d4")))
    out["in_lab"]["bccd pipeline, scale measured"] = {**short(m), "detection": m["detection"]}
    print("bccd pipeline", out["in_lab"]["bccd pipeline, scale measured"], flush=True)
    args.output.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
