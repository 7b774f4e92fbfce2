"""Measure the built-in stain reference on the PBC data set.

Fits every registered stain method (region colours, Macenko, Reinhard) on
pixels pooled from a seeded, class-stratified sample of PBC crops, with the
same function that fits a user's image (napari_wbc.stain.fit_stain_reference:
glass, red cells and nuclei segmented, nuclei, red cells and other stained
pixels sampled in equal numbers), so normalizing a PBC-like image onto it is
close to the identity. Writes src/napari_wbc/resources/pbc_stain_reference.json.

    python scripts/fit_default_reference.py [--data ../shared/data] [--per-class 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from napari_wbc.settings import data_root
from napari_wbc.stain import fit_stain_reference

OUT = Path(__file__).resolve().parents[1] / "src/napari_wbc/resources/pbc_stain_reference.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--pixels-per-image", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=OUT)
    args = parser.parse_args()

    table = pd.read_csv(args.data / "pbc" / "labels.csv")
    sample = table.groupby("label", group_keys=False).sample(
        n=args.per_class, random_state=args.seed
    )
    rng = np.random.default_rng(args.seed)
    pooled = []
    for rel in sample["path"]:
        pixels = np.asarray(Image.open(args.data / "pbc" / rel).convert("RGB")).reshape(-1, 3)
        take = min(len(pixels), args.pixels_per_image)
        pooled.append(pixels[rng.choice(len(pixels), take, replace=False)])
    pixels = np.concatenate(pooled)
    ref = fit_stain_reference(
        pixels,
        description=(
            f"PBC (Acevedo et al. 2020), {len(sample)} crops, {args.per_class} per class, "
            f"seed {args.seed}"
        ),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(ref.to_dict(), indent=2) + "\n")
    print(json.dumps(ref.to_dict(), indent=2))


if __name__ == "__main__":
    main()
