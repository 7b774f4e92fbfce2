"""How far BCCD's own labels can take a model: the in-lab ceiling for issue #12.

    python -m research.bccd_inlab_ceiling outputs/lolo5c-s0/dr-bccd -o outputs/bccd-ceiling

Issue #12 asks for macro-F1 >= 0.80 on BCCD with no BCCD label (leave one lab
out). This script measures what the same network reaches *with* BCCD's
labels, on BCCD cells it did not train on, so that the transfer figure can be
read against a ceiling rather than against 1.0.

BCCD's cells are split into ``--folds`` folds by image (a field's cells stay
together; its two basophils go to different folds). For each fold, the
BCCD-fold model (trained on PBC and LISC, never on BCCD) is trained on for
``--epochs`` more stage-1 epochs (``--aug``) with the other folds' BCCD cells as a third
lab, then a fresh stage 2 (``scripts/train_crosslab.py --init-from ...
--extra ...``, the recipe of the self-training experiment). A control gets
the same extra epochs without any BCCD cell, so extra training is not
credited to BCCD's labels. Every model is scored on each fold's held-out
cells, the network's 96 px input of the cached crops, no TTA:

- ``transfer``: the fold model as trained (no BCCD label);
- ``control``: + the extra epochs on PBC and LISC only;
- ``in-lab``: + the extra epochs with the other folds' BCCD labels.

Cells that the transfer model (no BCCD label) and the in-lab model (other
folds' labels) both call the same class, against the label, are listed by
label -> answer and drawn in ``agreed-errors.jpg`` (the crops as the network
sees them): two models that learned from different labels agreeing against
a label is where the label itself is most in doubt.

Runs are resumable: a fold whose model file exists is not retrained.

It ran with the retired experimental trainer, whose ``--init-from`` and
``--extra`` the product's trainer (napari_wbc.crosslab) does not have:
restore it with ``git show 878e6a3:scripts/train_crosslab.py >
scripts/train_crosslab.py`` to run this study again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from napari_wbc.crosslab import predict_crops
from napari_wbc.datasets import SHARED_CLASSES, cached_lab_crops
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.files import load_network


def image_folds(paths: list[str], labels: list[str], n_folds: int, seed: int = 0) -> np.ndarray:
    """A fold per cell: whole images to folds, rarest classes spread first.

    Images are taken in order of their rarest cell's class count (basophil
    fields first), each to the fold that holds fewest cells of that class so
    far (ties: fewest cells overall, then a seeded draw).
    """
    rng = np.random.default_rng(seed)
    counts = {c: labels.count(c) for c in set(labels)}
    images: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        images.setdefault(p, []).append(i)
    order = list(images)
    rng.shuffle(order)
    order.sort(key=lambda p: min(counts[labels[i]] for i in images[p]))
    per_class = np.zeros((n_folds, len(counts)), int)
    names = sorted(counts)
    fold = np.empty(len(paths), int)
    for p in order:
        cells = images[p]
        rare = min((labels[i] for i in cells), key=lambda c: counts[c])
        c = names.index(rare)
        size = per_class.sum(1)
        key = [(per_class[f, c], size[f], rng.random()) for f in range(n_folds)]
        f = min(range(n_folds), key=lambda k: key[k])
        for i in cells:
            fold[i] = f
            per_class[f, names.index(labels[i])] += 1
    return fold


def train(args, out: Path, extra: Path | None) -> Path:
    model = out / "model.safetensors"
    if model.is_file():
        return model
    cmd = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "scripts" / "train_crosslab.py"),
        "--holdout", "bccd", "--classes", "shared", "--aug", args.aug,
        "--input", str(args.input), "--epochs1", str(args.epochs), "--lr", "5e-4",
        "--init-from", str(args.base), "--threads", "1", "--seed", "0", "-o", str(out),
    ]  # fmt: skip
    if extra is not None:
        cmd += ["--extra", str(extra)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return model


def scores(y: np.ndarray, pred: np.ndarray) -> dict:
    m = classification_metrics(y, pred, SHARED_CLASSES)
    per = {c: float(m["per_class"][c]["f1"]) for c in SHARED_CLASSES}
    four = [per[c] for c in SHARED_CLASSES if c != "basophil"]
    return {
        "macro_f1": float(m["macro_f1"]),
        "macro_f1_without_basophil": float(np.mean(four)),
        "per_class_f1": per,
    }


def agreed_errors(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, list[int]]:
    """Cells both models call the same wrong class, keyed ``label -> answer``."""
    out: dict[str, list[int]] = {}
    for i in np.flatnonzero((a == b) & (a != y)):
        key = f"{SHARED_CLASSES[y[i]]} -> {SHARED_CLASSES[a[i]]}"
        out.setdefault(key, []).append(int(i))
    return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def draw_grid(path: Path, crops: np.ndarray, groups: dict[str, list[int]], size: int) -> None:
    """One row per ``label -> answer`` group (up to 10 cells), at the network's input size."""
    cell, label_w, per_row = size * 2, 230, 10
    rows = [(k, v[:per_row]) for k, v in groups.items()]
    img = Image.new("RGB", (label_w + per_row * cell, max(1, len(rows)) * cell), "white")
    draw = ImageDraw.Draw(img)
    for r, (key, idx) in enumerate(rows):
        draw.text(
            (6, r * cell + cell // 2 - 14), f"{key}\n({len(groups[key])} cells)", fill="black"
        )
        for j, i in enumerate(idx):
            tile = Image.fromarray(crops[i]).resize((size, size), Image.BILINEAR)
            img.paste(tile.resize((cell, cell), Image.NEAREST), (label_w + j * cell, r * cell))
    img.save(path, quality=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("base", type=Path, help="a BCCD-fold run folder (trained without BCCD)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--input", type=int, default=96)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split into folds")
    p.add_argument(
        "--aug",
        choices=["dr", "mild"],
        default="dr",
        help="augmentation of the extra epochs: the fold model's domain randomization, or "
        "flips, rotations and a small zoom (BCCD's own colours and blur kept)",
    )
    args = p.parse_args(argv)
    args.base = args.base / "model.safetensors" if args.base.is_dir() else args.base
    out = args.output
    out.mkdir(parents=True, exist_ok=True)

    table, crops = cached_lab_crops("bccd", Path("outputs/crosslab/cache"), 128, 4.8)
    labels = table["label"].tolist()
    fold = image_folds(table["path"].tolist(), labels, args.folds, args.split_seed)
    y = np.array([SHARED_CLASSES.index(v) for v in labels])
    jobs = []
    for k in range(args.folds):
        tr = fold != k
        npz = out / f"fold{k}" / "extra.npz"
        npz.parent.mkdir(parents=True, exist_ok=True)
        if not npz.is_file():
            np.savez(npz, crops=crops[tr], labels=np.array(labels)[tr])
        jobs.append((out / f"fold{k}", npz))
    jobs.append((out / "control", None))
    with ThreadPoolExecutor(args.parallel) as pool:
        models = list(pool.map(lambda j: train(args, *j), jobs))

    def run(model_path: Path, idx: np.ndarray) -> np.ndarray:
        model, config = load_network(model_path, cache=False)
        spec = config.spec
        return predict_crops(model, crops[idx], spec).argmax(1)

    # transfer and control never saw a BCCD cell: one pass over all of them each
    every = np.arange(len(y))
    preds = {"transfer": run(args.base, every), "control": run(models[-1], every)}
    preds["in-lab"] = np.empty(len(y), int)
    for k in range(args.folds):
        te = np.flatnonzero(fold == k)
        preds["in-lab"][te] = run(models[k], te)
    result = {
        "base": str(args.base),
        "folds": args.folds,
        "split_seed": args.split_seed,
        "epochs": args.epochs,
        "aug": args.aug,
        "cells": len(y),
        "fold_sizes": np.bincount(fold).tolist(),
        "basophil_folds": fold[y == SHARED_CLASSES.index("basophil")].tolist(),
        "scores": {name: scores(y, pr) for name, pr in preds.items()},
    }
    agreed = agreed_errors(y, preds["transfer"], preds["in-lab"])
    errors = {n: int((pr != y).sum()) for n, pr in preds.items()}
    result["errors"] = errors
    result["agreed_errors"] = {k: len(v) for k, v in agreed.items()}
    result["agreed_error_images"] = {
        k: [Path(q).name for q in table["path"].iloc[v]] for k, v in agreed.items()
    }
    draw_grid(out / "agreed-errors.jpg", crops, agreed, args.input)
    (out / "ceiling.json").write_text(json.dumps(result, indent=1))
    print(
        f"BCCD, {len(y)} cells, {args.folds} folds by image (split seed {args.split_seed}), "
        f"{args.input} px, no TTA, --aug {args.aug}"
    )
    print("| model | macro-F1 (5) | without basophil (4) | " + " | ".join(SHARED_CLASSES) + " |")
    print("|---|---:|---:|" + "---:|" * len(SHARED_CLASSES))
    for name, s in result["scores"].items():
        per = " | ".join(f"{s['per_class_f1'][c]:.2f}" for c in SHARED_CLASSES)
        print(f"| {name} | {s['macro_f1']:.3f} | {s['macro_f1_without_basophil']:.3f} | {per} |")
    n_agreed = sum(len(v) for v in agreed.values())
    print(
        f"errors: transfer {errors['transfer']}, in-lab {errors['in-lab']}; "
        f"{n_agreed} cells both call the same other class: "
        + ", ".join(f"{k} {len(v)}" for k, v in agreed.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
