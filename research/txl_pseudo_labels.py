"""Pseudo-label the white cells of the unlabelled txl/ fields with a fold's own models (#12).

    python -m research.txl_pseudo_labels --holdout bccd outputs/lolo8c outputs/lolo8c-s1 \
        -o outputs/s11/txl-bccd.npz

Self-training across labs: the teacher is the leave-one-lab-out fold ensemble
of ``--holdout`` (its models never saw that lab), so the held-out lab stays
unread. Each white-cell box of txl/ (Raabin-WBC and the bcd set: two more
labs' stains and optics, no cell types) is cut at the training field of view
(4.8 red-cell diameters; the red cells' size is the median of the source's
own red-cell boxes), classified with D4 by every member, and kept when the
mean probability of its top class is at least ``--min-confidence``. The
threshold is fixed in advance (0.8), not chosen on any held-out figure.

Writes ``crops`` (N, 128, 128, 3) uint8, ``labels``, ``confidence`` and
``paths`` to an .npz that the retired experimental trainer's ``--extra`` read (``git show 878e6a3:scripts/train_crosslab.py``), and a
PNG grid of the kept crops per class next to it to look at.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from benchmarks.bench_crosslab import probabilities, save_grid, to_input

from napari_wbc.atomic import atomic_write_stream
from napari_wbc.datasets import read_lab_crops
from napari_wbc.models.files import load_network
from napari_wbc.settings import data_root

#: The crop cache side and field of view (red-cell diameters) of the models it labelled for.
CACHE_SIZE = 128
FOV_RBC = 4.8

log = logging.getLogger("txl_pseudo_labels")


def txl_table() -> pd.DataFrame:
    """Every txl white-cell box: path, centre and the source's red-cell diameter."""
    root = data_root() / "txl"
    boxes = pd.read_csv(root / "boxes.csv")
    rbc = boxes[boxes["label"] == "rbc"]
    diameter = ((rbc["w"] + rbc["h"]) / 2).groupby(rbc["source"]).median()
    wbc = pd.read_csv(root / "wbc.csv")
    source = wbc["path"].str.split("/").str[1]
    return pd.DataFrame(
        {
            "path": [str(root / p) for p in wbc["path"]],
            "label": "unlabeled",
            "lab": "txl-" + source,
            "cy": wbc["y"] + wbc["h"] / 2,
            "cx": wbc["x"] + wbc["w"] / 2,
            "rbc_px": source.map(diameter).astype(float),
        }
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+", help="fold folders (one per seed)")
    p.add_argument("--holdout", choices=["pbc", "lisc", "bccd"], required=True)
    p.add_argument("--min-confidence", type=float, default=0.8)
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    table = txl_table()
    crops = read_lab_crops(table, CACHE_SIZE, FOV_RBC)
    prob, classes = 0.0, None
    for root in args.roots:
        model, config = load_network(
            root / f"dr-{args.holdout}" / "model.safetensors", cache=False
        )
        classes = tuple(config.spec.classes)
        prob = prob + probabilities(model, to_input(crops, config), tta=True) / len(args.roots)
    top = prob.argmax(1)
    conf = prob.max(1)
    keep = conf >= args.min_confidence
    labels = np.asarray(classes)[top]
    for lab in sorted(set(table["lab"])):
        mine = (table["lab"] == lab).to_numpy()
        log.info(
            "%s: %d cells, %d kept: %s",
            lab,
            mine.sum(),
            (mine & keep).sum(),
            pd.Series(labels[mine & keep]).value_counts().to_dict(),
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_stream(
        args.output,
        lambda fh: np.savez(
            fh,
            crops=crops[keep],
            labels=labels[keep],
            confidence=conf[keep],
            paths=np.asarray(table["path"], str)[keep],
        ),
        binary=True,
    )
    save_grid(crops[keep], labels[keep], args.output.with_suffix(".png"), 12, classes)
    log.info("wrote %s (%d of %d cells)", args.output, keep.sum(), len(keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
