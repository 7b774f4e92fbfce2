"""Build the real-data samples shipped in the package from ../shared/data.

    python scripts/make_real_samples.py [--data DIR]

Writes into src/napari_wbc/resources/samples/:

- ``bccd-fields.jpg`` + ``bccd-fields.csv``: six BCCD smear fields (640×480,
  MIT licence) tiled 3 × 2, chosen by a fixed rule (not by how the model does
  on them): every field has exactly one white-cell box with a cell type, and
  together they show each of BCCD's five types (the first field of each type
  in file order, plus the second neutrophil field). The CSV holds the box
  centres and classes in mosaic pixels.
- ``pbc-gallery.jpg`` + ``pbc-gallery.csv``: three PBC cells per class
  (CC BY 4.0), the whole 360 px crops halved to 180 px (0.2 µm/px) and tiled
  6 × 4; drawn with a fixed seed from the built-in model's validation split
  (seeded, stratified, never trained on; see MODEL_CARD.md). The BCCD fields
  are in the built-in model's training data (all of BCCD is): they show the
  tool at work, not a transfer figure.
- ``LICENSE-BCCD.txt`` and ``ATTRIBUTION-PBC.txt``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from napari_wbc.datasets import load_lab_table, stratified_split
from napari_wbc.models.registry import PBC_CLASSES
from napari_wbc.settings import data_root

TARGET = Path(__file__).resolve().parents[1] / "src/napari_wbc/resources/samples"
BCCD_TYPES = ("neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil", "neutrophil")
GALLERY_PER_CLASS = 3
GALLERY_COLUMNS = 6
TILE = 180  # PBC crops (360 px at 0.1 µm/px) halved
QUALITY = 92

PBC_ATTRIBUTION = """\
The cell gallery (pbc-gallery.jpg) shows crops from the PBC dataset:
Acevedo A., Merino A., Alférez S., Molina Á., Boldú L., Rodellar J.
"A dataset of microscopic peripheral blood cell images for development of
automatic recognition systems." Data in Brief 30 (2020) 105474.
https://doi.org/10.1016/j.dib.2020.105474
Hospital Clinic of Barcelona, CellaVision DM96, May Grünwald-Giemsa stain.
Licensed under Creative Commons Attribution 4.0 (CC BY 4.0),
https://creativecommons.org/licenses/by/4.0/
Changes: crops halved in size (360 → 180 px) and tiled into one image.
"""


def build_bccd(data: Path) -> None:
    wbc = pd.read_csv(data / "bccd" / "wbc.csv")
    per_field = wbc.groupby("path")
    single = [p for p, rows in per_field if len(rows) == 1]
    rows = wbc[wbc.path.isin(single)].sort_values("path")
    chosen, used = [], set()
    for label in BCCD_TYPES:
        pick = rows[(rows.label == label) & ~rows.path.isin(used)].iloc[0]
        used.add(pick.path)
        chosen.append(pick)
    fields = [np.asarray(Image.open(data / "bccd" / p.path).convert("RGB")) for p in chosen]
    h, w = fields[0].shape[:2]
    mosaic = np.zeros((2 * h, 3 * w, 3), np.uint8)
    truth = []
    for i, (field, box) in enumerate(zip(fields, chosen, strict=True)):
        r, c = divmod(i, 3)
        mosaic[r * h : (r + 1) * h, c * w : (c + 1) * w] = field
        truth.append(
            {
                "x": c * w + box.x + box.w / 2,
                "y": r * h + box.y + box.h / 2,
                "class": box.label,
                "width": box.w,
                "height": box.h,
                "source": Path(box.path).name,
            }
        )
    Image.fromarray(mosaic).save(TARGET / "bccd-fields.jpg", quality=QUALITY)
    pd.DataFrame(truth).to_csv(TARGET / "bccd-fields.csv", index=False)
    shutil.copyfile(data / "bccd" / "LICENSE", TARGET / "LICENSE-BCCD.txt")
    print(f"bccd-fields: {len(truth)} cells from {[t['source'] for t in truth]}")


def build_gallery(data: Path) -> None:
    # The validation split of the built-in model (napari_wbc.crosslab.pbc_split:
    # 20 % of each class of PBC's 8-class table, seed 0; never trained on).
    table = load_lab_table("pbc", root=data, classes=PBC_CLASSES)
    _, va = stratified_split(table["label"].tolist(), 0.2, seed=0)
    val = table.iloc[va]
    rng = np.random.default_rng(0)
    classes = sorted(val.label.unique())
    tiles, truth = [], []
    for label in classes:
        paths = sorted(val[val.label == label].path)
        for path in rng.choice(paths, GALLERY_PER_CLASS, replace=False):
            img = Image.open(path).convert("RGB").resize((TILE, TILE), Image.LANCZOS)
            tiles.append(np.asarray(img))
            truth.append({"class": label, "source": Path(path).name})
    rows = -(-len(tiles) // GALLERY_COLUMNS)
    gallery = np.full((rows * TILE, GALLERY_COLUMNS * TILE, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, GALLERY_COLUMNS)
        gallery[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] = tile
        truth[i].update(x=c * TILE + TILE / 2, y=r * TILE + TILE / 2)
    Image.fromarray(gallery).save(TARGET / "pbc-gallery.jpg", quality=QUALITY)
    cols = ["x", "y", "class", "source"]
    pd.DataFrame(truth)[cols].to_csv(TARGET / "pbc-gallery.csv", index=False)
    (TARGET / "ATTRIBUTION-PBC.txt").write_text(PBC_ATTRIBUTION, encoding="utf-8")
    print(f"pbc-gallery: {len(tiles)} cells, {len(classes)} classes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_root())
    args = parser.parse_args()
    TARGET.mkdir(parents=True, exist_ok=True)
    build_bccd(args.data)
    build_gallery(args.data)
    total = sum(p.stat().st_size for p in TARGET.iterdir())
    print(f"{TARGET}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
