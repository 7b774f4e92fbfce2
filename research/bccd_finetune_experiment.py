"""Fine-tuning on a few cells of another lab: BCCD, at most 50 labelled cells.

    python -m research.bccd_finetune_experiment [-o outputs/bccd-finetune] [--per-class 12]

Draws (seeded) up to --per-class labelled white cells per class from
../shared/data/bccd/wbc.csv (classes with fewer than 2 cells to spare are left
out of training), cuts their crops at the model's field of view, fine-tunes the
built-in ensemble's first member on them (both stages, from its weights), and
compares macro-F1 on all the *other* labelled BCCD cells before and after.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from napari_wbc.annotations import base_model_file, iter_finetune_crops, iter_write_training_crops
from napari_wbc.images import read_smear
from napari_wbc.inference import load_any
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.files import default_model_path, read_model_config
from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
from napari_wbc.progress import run
from napari_wbc.settings import data_root
from napari_wbc.smears import NO_CLASS_LABELS, load_boxes
from napari_wbc.training import TrainConfig

RBC_PX = 98.0  # BCCD's median red-cell diameter measured by napari_wbc.scale


def classify(model, cells: pd.DataFrame, stain: bool) -> list[str]:
    ensemble = load_any(model)
    preds = []
    for path, rows in cells.groupby("path", sort=False):
        centres = np.stack([rows.y + rows.h / 2, rows.x + rows.w / 2], axis=1)
        config = ClassifyConfig(rbc_diameter_px=RBC_PX, stain_normalize=stain, tta="d4")
        out = run(
            iter_classify_smear(read_smear(path).levels[0], ensemble, config, points=centres)
        )
        preds.append(pd.Series(out["class"].to_numpy(), index=rows.index))
    return pd.concat(preds).reindex(cells.index).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/bccd-finetune"))
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.output
    out.mkdir(parents=True, exist_ok=True)

    boxes = load_boxes(args.data / "bccd" / "wbc.csv")
    cells = boxes[~boxes["label"].str.lower().isin(NO_CLASS_LABELS)]
    rng = np.random.default_rng(args.seed)
    picked = []
    for _, rows in cells.groupby("label"):
        n = min(args.per_class, len(rows) - 2)
        if n >= 2:
            picked.extend(rng.choice(rows.index, n, replace=False))
    train, test = cells.loc[sorted(picked)], cells.drop(index=picked)
    assert len(train) <= 50

    base = default_model_path()
    ensemble = load_any(base)
    side = round(ensemble.fov_rbc * RBC_PX)
    crops = []
    for path, rows in train.groupby("path"):
        table = pd.DataFrame(
            {"x": rows.x + rows.w / 2, "y": rows.y + rows.h / 2, "class": rows.label}
        )
        image = read_smear(path).levels[0].compute()
        folder = out / "crops"
        written = run(
            iter_write_training_crops(
                image, table.rename(columns={"class": "label"}), folder, side
            )
        )
        crops.append(written)
    crops = pd.concat(crops, ignore_index=True)
    tuned = out / "bccd-tuned.safetensors"
    # Reuse an earlier fine-tuned model only if it was tuned from this very base file.
    base_file = base_model_file(base)
    if tuned.exists() and (
        read_model_config(tuned).training.get("base_model") != str(base_file)
        or tuned.stat().st_mtime < base_file.stat().st_mtime
    ):
        print(f"{tuned} was tuned from another or an older base model; tuning again")
        tuned.unlink()
    if not tuned.exists():
        config = TrainConfig(epochs_stage1=8, epochs_stage2=8, seed=args.seed, stain_normalize=False,
                             val_fraction=0.25, num_threads=2)  # fmt: skip
        run(iter_finetune_crops(crops, base, tuned, config))

    y = test["label"].tolist()
    results = {
        "n_train": len(train),
        "train_counts": train["label"].value_counts().to_dict(),
        "n_test": len(test),
    }
    classes = list(ensemble.classes)
    for name, model, stain in (
        ("default ensemble, Macenko", base, True),
        ("default ensemble, no normalization", base, False),
        ("base member (resnet18), no normalization", base_model_file(base), False),
        ("fine-tuned resnet18, no normalization", tuned, False),
    ):
        m = classification_metrics(y, classify(model, test, stain), classes)
        results[name] = {k: m[k] for k in ("n", "accuracy", "macro_f1", "balanced_accuracy")}
        print(name, results[name], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| model | accuracy | macro-F1 | balanced acc. |\n|---|---:|---:|---:|")
    for name in list(results)[3:]:
        r = results[name]
        print(
            f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['balanced_accuracy']:.3f} |"
        )


if __name__ == "__main__":
    main()
