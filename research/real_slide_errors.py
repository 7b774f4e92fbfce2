"""Classify the real-cell slide and show the cells it got wrong (issue #15).

    python -m research.real_slide_errors /tmp/napari-wbc-real-slide-20000.tif -o errors.png

The slide and its ``.csv`` of pasted cells come from
``benchmarks/real_cell_slide.py``. Classified with the defaults
(``--model auto``), matched as ``bench_slide.py --truth`` does; prints the
confusion of classes and saves a grid of up to 6 misclassified cells per
true class, cut from the slide around each detected centre.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from benchmarks.bench_slide import MATCH_PX
from scipy.spatial import cKDTree

from napari_wbc.images import read_smear
from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
from napari_wbc.progress import run
from napari_wbc.routing import load_model
from napari_wbc.threads import configure_threads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tiff", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=6)
    args = p.parse_args(argv)
    configure_threads(2)
    truth = pd.read_csv(args.tiff.with_suffix(".csv"))
    smear = read_smear(str(args.tiff))
    try:
        cells = run(iter_classify_smear(smear, load_model("auto"), ClassifyConfig(device="cpu")))
        dist, idx = cKDTree(truth[["y", "x"]].to_numpy()).query(cells[["y", "x"]].to_numpy())
        hit = dist <= MATCH_PX
        cells = cells[hit].assign(true=truth["label"].to_numpy()[idx[hit]])
        print(pd.crosstab(cells["true"], cells["class"]).to_string())
        wrong = cells[cells["true"] != cells["class"]]
        rows = [g.head(args.per_class) for _, g in wrong.groupby("true")]
        side, half = 160, 150
        from PIL import Image, ImageDraw

        grid = Image.new("RGB", (side * args.per_class, (side + 14) * len(rows)), "white")
        draw = ImageDraw.Draw(grid)
        level = smear.levels[0]
        for r, group in enumerate(rows):
            for c, (_, cell) in enumerate(group.iterrows()):
                y, x = round(cell.y), round(cell.x)
                y0, x0 = max(y - half, 0), max(x - half, 0)
                crop = np.asarray(level[y0 : y + half, x0 : x + half].compute())
                tile = Image.fromarray(crop).resize((side, side))
                grid.paste(tile, (c * side, r * (side + 14) + 14))
                draw.text(
                    (c * side + 2, r * (side + 14)), f"{cell.true}->{cell['class']}", "black"
                )
        grid.save(args.output)
        print(f"{len(wrong)} of {len(cells)} matched cells wrong; grid: {args.output}")
    finally:
        smear.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
