"""Measure napari_wbc.crop_scale.NUCLEUS_PER_RBC on PBC crops (known scale).

    python scripts/calibrate_crop_scale.py      # ~1 min

Median equivalent diameter of the central nuclear region over 200 PBC crops
(40 per class of the five common classes, seed 0), divided by PBC's red-cell
diameter (75 px, the data README and the model's spec). Also prints the
red-cell estimate of measure_crop_scale on the same crops as a check.
"""

import numpy as np

from napari_wbc.crop_scale import measure_crop_scale, measure_nucleus_diameter
from napari_wbc.datasets import balanced_subset, decode_image, load_lab_table

PBC_RBC_PX = 75.0


def main() -> None:
    table = balanced_subset(load_lab_table("pbc"), per_class=40, seed=0)
    crops = [decode_image(p) for p in table["path"]]
    nuclei = np.array([d for d in (measure_nucleus_diameter(c) for c in crops) if d])
    print(f"nuclei measured in {len(nuclei)} of {len(crops)} crops")
    for label in sorted(set(table["label"])):
        sub = [
            measure_nucleus_diameter(c)
            for c, lab in zip(crops, table["label"], strict=True)
            if lab == label
        ]
        sub = [d for d in sub if d]
        print(f"  {label}: median {np.median(sub):.1f} px ({len(sub)})")
    print(f"NUCLEUS_PER_RBC = {np.median(nuclei) / PBC_RBC_PX:.3f}")
    print("red-cell estimate:", measure_crop_scale(crops))


if __name__ == "__main__":
    main()
