"""Which compact backbones learn blood cells from random weights on a CPU?

Trains each candidate (stage 1 only, no ImageNet weights, as on an offline
machine) on a small, balanced, seeded PBC subset and reports validation
macro-F1 and the time taken. Used to choose the `lite` preset.

    python -m research.screen_backbones [--per-class 150] [--epochs 8] [--input-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from napari_wbc.datasets import balanced_subset, load_labelled_crops
from napari_wbc.models.files import read_model_config
from napari_wbc.models.registry import ModelSpec, register_preset
from napari_wbc.settings import data_root
from napari_wbc.training import TrainConfig, train

CANDIDATES = [
    "resnet18", "resnet10t", "regnety_004", "convnext_atto", "efficientnet_b0",
    "mobilenetv4_conv_small", "ghostnet_100", "mobilenetv3_large_100", "edgenext_xx_small",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--archs", nargs="*", default=CANDIDATES)
    args = parser.parse_args()
    df = load_labelled_crops(data_root() / "pbc" / "labels.csv")
    df = balanced_subset(df, "label", per_class=args.per_class, seed=0)
    register_preset("screen", [ModelSpec(f"screen-{a}", a, args.input_size) for a in args.archs])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            t = time.perf_counter()
            out = train(
                df,
                TrainConfig(
                    spec=f"screen-{arch}",
                    epochs_stage1=args.epochs,
                    stages="stage1",
                    input_size=args.input_size,
                    num_threads=2,
                ),
                Path(tmp) / f"{arch}.safetensors",
            )
            seconds = time.perf_counter() - t
            f1 = read_model_config(out).metrics["macro_f1"]
            rows.append((arch, f1, seconds))
            print(f"{arch}: val macro-F1 {f1:.3f} in {seconds:.0f} s", flush=True)
    print(
        f"\n{len(df)} crops ({args.per_class}/class), {args.epochs} epochs, {args.input_size} px\n"
    )
    print("| backbone | val macro-F1 | seconds |\n|---|---:|---:|")
    for arch, f1, seconds in sorted(rows, key=lambda r: -r[1]):
        print(f"| {arch} | {f1:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
