"""A whole-slide-sized smear whose white cells are real: PBC validation cells (issue #15).

    python benchmarks/real_cell_slide.py [--size 20000] [-o /tmp/napari-wbc-real-slide-20000.tif]
        [--preview preview.png]

The synthetic smear of ``bench_slide.py`` (``napari_wbc.synthetic``, 0.1
µm/px, PBC's white-cell density) draws its white cells, and the classifier
is unsure of many of those drawings. Here each drawn white cell is covered
by a real one: the centre of a PBC crop (a disc of 30 µm with a feathered
rim, its own red cells and glass around the cell), drawn at random from
PBC's seeded validation split, which neither built-in model trained on. PBC
is at about the same scale (a red cell 75 px), so crops are pasted as they
are. The result is written as a tiled pyramidal TIFF, with the pasted
cells' centres and classes beside it (``<output>.csv``), so that a
classification of the slide can be scored (``bench_slide.py --truth``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

#: Radius (px) of the pasted disc, and the width of its feathered rim.
RADIUS = 150
FEATHER = 24


def _validation_crops(seed: int, n: int) -> pd.DataFrame:
    from napari_wbc.datasets import load_lab_table, stratified_split
    from napari_wbc.models.registry import PBC_CLASSES

    pbc = load_lab_table("pbc", classes=PBC_CLASSES)
    _, validation = stratified_split(pbc["label"].tolist(), 0.2, seed=0)
    table = pbc.iloc[validation]
    # Platelets are not white cells: a detector of white cells rightly skips them.
    table = table[table["label"] != "platelet"].reset_index(drop=True)
    pick = np.random.default_rng(seed).choice(len(table), n, replace=len(table) < n)
    return table.iloc[pick].reset_index(drop=True)


def real_cell_smear(size: int, seed: int = 0, chunks: int = 2048):
    """The lazy smear with its white cells replaced; (dask array, truth table)."""
    from napari_wbc.datasets import decode_image
    from napari_wbc.synthetic import lazy_smear, smear_truth

    base = lazy_smear((size, size), seed=seed, chunks=chunks)
    truth = smear_truth((size, size), seed)
    sites = truth[truth["kind"] == "wbc"][["y", "x"]].reset_index(drop=True)
    crops = _validation_crops(seed, len(sites))
    sites["label"] = crops["label"].to_numpy()
    sites["path"] = crops["path"].to_numpy()
    yy, xx = np.mgrid[-RADIUS : RADIUS + 1, -RADIUS : RADIUS + 1]
    alpha = np.clip((RADIUS - np.hypot(yy, xx)) / FEATHER, 0, 1)[..., None].astype(np.float32)

    def paste(block, block_info=None):
        (y0, y1), (x0, x1), _ = block_info[0]["array-location"]
        out = block.astype(np.float32)
        near = sites[
            (sites.y > y0 - RADIUS - 1)
            & (sites.y < y1 + RADIUS + 1)
            & (sites.x > x0 - RADIUS - 1)
            & (sites.x < x1 + RADIUS + 1)
        ]
        for cy, cx, path in zip(near.y, near.x, near.path, strict=True):
            crop = decode_image(path).astype(np.float32)
            h, w = crop.shape[:2]
            if min(h, w) < 2 * RADIUS + 1:
                raise SystemExit(f"{path}: {h}x{w} px, smaller than the pasted disc")
            cyi, cxi = round(float(cy)), round(float(cx))
            oy, ox = h // 2 - RADIUS, w // 2 - RADIUS  # the crop's disc, top-left
            # The disc's square in slide coordinates, clipped to this block.
            ty0, tx0 = max(cyi - RADIUS, y0), max(cxi - RADIUS, x0)
            ty1, tx1 = min(cyi + RADIUS + 1, y1), min(cxi + RADIUS + 1, x1)
            if ty0 >= ty1 or tx0 >= tx1:
                continue
            sy, sx = ty0 - (cyi - RADIUS), tx0 - (cxi - RADIUS)
            a = alpha[sy : sy + ty1 - ty0, sx : sx + tx1 - tx0]
            src = crop[oy + sy : oy + sy + ty1 - ty0, ox + sx : ox + sx + tx1 - tx0]
            dst = out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
            dst[:] = a * src + (1 - a) * dst
        return np.clip(np.round(out), 0, 255).astype(np.uint8)

    return base.map_blocks(paste, dtype=np.uint8), sites


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, default=None)
    p.add_argument("--preview", type=Path, help="also save a 2048 px corner as PNG")
    args = p.parse_args(argv)
    import tempfile

    from napari_wbc.progress import run
    from napari_wbc.tiff import iter_write_pyramid_tiff

    out = args.output or Path(tempfile.gettempdir()) / f"napari-wbc-real-slide-{args.size}.tif"
    smear, sites = real_cell_smear(args.size, args.seed)
    if args.preview:
        from PIL import Image

        Image.fromarray(np.asarray(smear[:2048, :2048].compute())).save(args.preview)
    t = time.perf_counter()
    run(iter_write_pyramid_tiff(str(out), smear, 0.1))
    sites[["y", "x", "label", "path"]].to_csv(out.with_suffix(".csv"), index=False)
    print(f"{out}: {len(sites)} real white cells, {time.perf_counter() - t:.0f} s")
    print(sites["label"].value_counts().to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
