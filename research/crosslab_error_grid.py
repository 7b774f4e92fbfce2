"""Pictures of a leave-one-lab-out fold model's mistakes on its held-out lab, as the model sees them.

    python -m research.crosslab_error_grid outputs/lolo8c/dr-bccd -o docs/images/crosslab-errors-bccd.png

One row per true class: up to 8 wrongly classified cells (the 96 px input,
no TTA), each captioned with the class the model gave.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_crosslab import probabilities, to_input
from PIL import Image, ImageDraw

from napari_wbc.datasets import SHARED_CLASSES, cached_lab_crops
from napari_wbc.models.files import load_network


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="fold folder with model.safetensors")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, config = load_network(args.run / "model.safetensors", cache=False)
    lab = config.training.get("holdout")
    if not isinstance(lab, str):  # napari_wbc.crosslab: the labs left out, or read them off
        from napari_wbc.datasets import LABS

        left = lab or [x for x in LABS if x not in config.training["labs"]]
        lab = left[0]
    classes = tuple(config.spec.classes)
    table, crops = cached_lab_crops(
        lab, "outputs/crosslab/cache", 128, round(config.spec.fov_rbc, 2)
    )
    x = to_input(crops, config)
    pred = probabilities(model, x).argmax(1)
    size = config.spec.input_size
    rows = []
    for name in SHARED_CLASSES:
        wrong = np.flatnonzero(
            (table["label"].to_numpy() == name) & (np.array(classes)[pred] != name)
        )
        tiles = []
        for i in wrong[: args.per_class]:
            tile = Image.fromarray(crops[i]).resize((size, size), Image.Resampling.BILINEAR)
            canvas = Image.new("RGB", (size, size + 14), "white")
            canvas.paste(tile, (0, 0))
            ImageDraw.Draw(canvas).text((2, size + 1), f"-> {classes[pred[i]]}", fill="black")
            tiles.append(np.asarray(canvas))
        tiles += [np.full((size + 14, size, 3), 255, np.uint8)] * (args.per_class - len(tiles))
        label = Image.new("RGB", (90, size + 14), "white")
        n = int((table["label"] == name).sum())
        ImageDraw.Draw(label).text((2, size // 2), f"{name}\n{len(wrong)}/{n} wrong", fill="black")
        rows.append(np.concatenate([np.asarray(label), *tiles], 1))
    Image.fromarray(np.concatenate(rows, 0)).save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
