"""Measure the figures of MODEL_CARD.md and docs/results.md for a model.

    python scripts/evaluate_default_model.py [--model M]
        [--validation outputs/default/validation.csv] [--heldout outputs/default/heldout.csv]
        [-o outputs/default/evaluation.json] [--per-class 200]

1. PBC validation split (seeded, stratified, never trained on): the ensemble
   and each member, with and without D4 test-time augmentation, plus a
   confusion-matrix PNG; then the PBC crops outside the training subset (a
   seeded balanced sample of the classes that have some) as a second check.
2. BCCD white cells (another lab): classification of the annotated cells
   (crops cut at the model's field of view around each box centre) with and
   without stain normalization (Macenko, Reinhard, none), at the dataset's
   measured red-cell size.
3. BCCD whole pipeline (detection + classification) with and without stain
   normalization, with the scale given (dataset median) or measured per image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from napari_wbc.datasets import balanced_subset, load_labelled_crops
from napari_wbc.images import read_smear
from napari_wbc.inference import load_any
from napari_wbc.metrics import classification_metrics, save_confusion_png
from napari_wbc.models.files import default_model_path, read_ensemble
from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
from napari_wbc.prediction import evaluate
from napari_wbc.progress import run
from napari_wbc.settings import data_root
from napari_wbc.smears import NO_CLASS_LABELS, iter_evaluate_smears, load_boxes

KEYS = ("n", "accuracy", "macro_f1", "balanced_accuracy")


def short(m: dict) -> dict:
    return {k: m[k] for k in KEYS if k in m}


def bccd_scale(boxes) -> float:
    """Median red-cell size measured on a sample of BCCD fields (px)."""
    from napari_wbc.scale import estimate_rbc_diameter

    sizes = []
    for path in list(dict.fromkeys(boxes["path"]))[::12]:
        try:
            sizes.append(estimate_rbc_diameter(read_smear(path).levels[0]).rbc_diameter_px)
        except Exception:
            continue
    return float(np.median(sizes))


def bccd_cells(boxes, ensemble, rbc_px: float, method: str | None) -> dict:
    labelled = boxes[~boxes["label"].str.lower().isin(NO_CLASS_LABELS)]
    y_true, y_pred = [], []
    for path, rows in labelled.groupby("path"):
        centres = np.stack([rows.y + rows.h / 2, rows.x + rows.w / 2], axis=1)
        image = read_smear(path).levels[0]
        config = ClassifyConfig(
            rbc_diameter_px=rbc_px,
            stain_normalize=method is not None,
            stain_method=method,
            tta="d4",
        )
        cells = run(iter_classify_smear(image, ensemble, config, points=centres))
        y_true += rows["label"].tolist()
        y_pred += cells["class"].tolist()
    return classification_metrics(y_true, y_pred, list(ensemble.classes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--validation", type=Path, default=Path("outputs/default/validation.csv"))
    parser.add_argument("--heldout", type=Path, default=Path("outputs/default/heldout.csv"))
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("outputs/default/evaluation.json")
    )
    parser.add_argument(
        "--confusion", type=Path, default=Path("docs/images/confusion-default.png")
    )
    args = parser.parse_args()
    model = args.model or default_model_path()
    out: dict = {"model": str(model)}

    # 1. PBC validation split, then the crops outside the training subset
    validation = load_labelled_crops(args.validation)
    out["pbc_validation_n"] = len(validation)
    t = time.perf_counter()
    # Same lab as training: the training set's stain statistics are the right
    # source (re-fitting on other crops adds noise); "fit" is shown for comparison.
    full = evaluate(model, validation, tta="d4", stain_source="training")
    out["pbc_seconds_ensemble_d4"] = time.perf_counter() - t
    save_confusion_png(full, args.confusion)
    out["pbc"] = {
        "ensemble d4": full,
        "ensemble none": short(evaluate(model, validation, tta="none", stain_source="training")),
        "ensemble d4, stain re-fitted on these crops": short(
            evaluate(model, validation, tta="d4", stain_source="fit")
        ),
    }
    config = read_ensemble(model) if model.suffix == ".json" else None
    if config is not None:
        for ref in config.members:
            member = Path(ref.path)  # resolved by read_ensemble
            for tta in ("none", "d4"):
                out["pbc"][f"{member.stem} {tta}"] = short(
                    evaluate(member, validation, tta=tta, stain_source="training")
                )
    if args.heldout.exists():
        heldout = balanced_subset(
            load_labelled_crops(args.heldout), per_class=args.per_class, seed=0
        )
        sample_csv = args.output.parent / "heldout-sample.csv"
        sample_csv.parent.mkdir(parents=True, exist_ok=True)
        heldout[["path", "label"]].to_csv(sample_csv, index=False)  # for `napari-wbc evaluate`
        out["pbc_heldout"] = evaluate(model, heldout, tta="d4", stain_source="training")
        print("held out:", short(out["pbc_heldout"]), flush=True)
    print(json.dumps({k: short(v) for k, v in out["pbc"].items()}, indent=1), flush=True)

    # 2. + 3. BCCD
    boxes = load_boxes(args.data / "bccd" / "wbc.csv")
    ensemble = load_any(model)
    rbc_px = bccd_scale(boxes)
    out["bccd_rbc_diameter_px"] = rbc_px
    out["bccd_cells"] = {
        f"stain {method or 'off'}": bccd_cells(boxes, ensemble, rbc_px, method)
        for method in ("macenko", "reinhard", None)
    }
    print(json.dumps({k: short(v) for k, v in out["bccd_cells"].items()}, indent=1), flush=True)
    out["bccd_pipeline"] = {}
    for stain in (True, False):
        for scale in ("given", "measured"):
            cfg = ClassifyConfig(
                rbc_diameter_px=rbc_px if scale == "given" else None,
                stain_normalize=stain,
                tta="d4",
            )
            m = run(iter_evaluate_smears(boxes, ensemble, cfg))
            out["bccd_pipeline"][f"stain {'on' if stain else 'off'}, scale {scale}"] = m
            print(
                f"stain {stain} scale {scale}: detection {m['detection']} classification {short(m)}",
                flush=True,
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
