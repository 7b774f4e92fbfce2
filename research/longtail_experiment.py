"""The paper's claim on real data: does decoupled training help on a long tail?

Builds from PBC (../shared/data/pbc) an 11-subtype problem (the 13 subtypes
less the two "unspecified" ones), holds out a balanced test set (seeded,
``--test-per-class`` per class), and draws a long-tailed training set from the
rest (exponential profile, imbalance ratio ``--ratio``, at most
``--max-per-class`` for the head class). For each backbone of the preset it
trains stage 1 (instance-balanced sampling, cross-entropy), then stage 2
(frozen backbone, class-aware sampling, hybrid loss) from the same stage-1
weights, and reports on the balanced test set:

  (a) single-stage cross-entropy      (stage 1 only, no TTA)
  (b) decoupled two-stage, hybrid loss (no TTA)
  (c) (b) with D4 test-time augmentation
  (d) the ensemble of the (c) models

    python -m research.longtail_experiment -o outputs/longtail [--preset lite]

Prints a Markdown table and writes results.json in the output folder. Runs can
be resumed: finished models are reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from napari_wbc.datasets import balanced_subset, load_labelled_crops, long_tailed_subset
from napari_wbc.models.files import save_ensemble
from napari_wbc.models.registry import get_preset
from napari_wbc.prediction import evaluate
from napari_wbc.settings import data_root
from napari_wbc.training import TrainConfig, train

UNSPECIFIED = ("neutrophil_unspecified", "immature_granulocyte_unspecified")


def build_sets(args) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = load_labelled_crops(args.data / "pbc" / "labels.csv")
    df = df[~df["subtype"].isin(UNSPECIFIED)].assign(label=lambda d: d["subtype"].astype(str))
    test = balanced_subset(df, "label", per_class=args.test_per_class, seed=args.seed)
    rest = df.drop(index=test.index)
    train_df = long_tailed_subset(
        rest, "label", imbalance_ratio=args.ratio, max_per_class=args.max_per_class, seed=args.seed
    )
    return train_df, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/longtail"))
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--ratio", type=float, default=100.0)
    parser.add_argument("--max-per-class", type=int, default=800)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--epochs1", type=int, default=12)
    parser.add_argument("--epochs2", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    train_df, test = build_sets(args)
    train_df.to_csv(out / "train.csv", index=False)
    test.to_csv(out / "test.csv", index=False)
    counts = train_df["label"].value_counts()
    print(f"train: {len(train_df)} crops, {counts.to_dict()}")
    print(f"test: {len(test)} crops, {args.test_per_class} per class")

    rows, timings, decoupled = [], {}, []
    for spec in get_preset(args.preset):
        base = dict(
            spec=spec.name, epochs_stage1=args.epochs1, epochs_stage2=args.epochs2,
            input_size=args.input_size, seed=args.seed, num_threads=args.threads,
        )  # fmt: skip
        stage1 = out / f"{spec.name}-stage1.safetensors"
        stage2 = out / f"{spec.name}-decoupled.safetensors"
        t0 = time.perf_counter()
        if not stage1.exists():
            train(train_df, TrainConfig(**base, stages="stage1"), stage1)
        t1 = time.perf_counter()
        if not stage2.exists():
            shutil.copyfile(stage1, stage2)
            train(train_df, TrainConfig(**base, stages="stage2"), stage2)
        t2 = time.perf_counter()
        timings[spec.name] = {"stage1_s": t1 - t0, "stage2_s": t2 - t1}
        a = evaluate(stage1, test, tta="none")
        b = evaluate(stage2, test, tta="none")
        c = evaluate(stage2, test, tta="d4")
        decoupled.append(stage2)
        for label, m in (("(a) single-stage CE", a), ("(b) decoupled + hybrid loss", b),
                         ("(c) (b) + D4 TTA", c)):  # fmt: skip
            rows.append({"model": spec.name, "setting": label, "macro_f1": m["macro_f1"],
                         "balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"]})  # fmt: skip
            print(rows[-1], flush=True)
    ensemble = out / "ensemble-decoupled.json"
    save_ensemble(ensemble, decoupled, tta="d4", name="longtail")
    d = evaluate(ensemble, test, tta="d4")
    rows.append({"model": "ensemble", "setting": "(d) ensemble of (c)", "macro_f1": d["macro_f1"],
                 "balanced_accuracy": d["balanced_accuracy"], "accuracy": d["accuracy"]})  # fmt: skip
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "rows": rows,
                "timings": timings,
                "train_counts": counts.to_dict(),
                "ensemble_metrics": d,
            },
            indent=2,
        )
    )
    print("\n| model | setting | macro-F1 | balanced acc. | accuracy |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['setting']} | {r['macro_f1']:.3f} | "
              f"{r['balanced_accuracy']:.3f} | {r['accuracy']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
