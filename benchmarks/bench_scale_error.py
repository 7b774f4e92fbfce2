"""What a wrong crop scale costs: PBC validation cut at the wrong field of view (issue #32).

    python benchmarks/bench_scale_error.py MODEL.safetensors [--factors 0.8 1.0 1.25]

The issue asks that a 25 % error in the measured red-cell size cost at most
0.02 macro-F1. A red cell measured 25 % too large makes every crop 25 % too
wide (factor 1.25: the cell looks smaller to the network); 25 % too small
gives factor 0.8. PBC's validation split (20 % of each class, seed 0, never
trained on) is cut from the crops cached at 4.8 red-cell diameters: a centre
square of ``factor × the model's field of view``, resized to its input, and
classified with the 8 flips and quarter turns. Prints macro-F1 per factor and
its change from 1.0. ``--hedged`` adds what ``evaluate`` does when the
measurement is unsure (napari_wbc.prediction.UNSURE_SCALE_FACTORS): the mean of
the probabilities with the red cell taken 0.8×, 1× and 1.25× the wrong figure.
Fields of view wider than the cached crops are padded with each crop's glass
colour, as the product pads a crop too tight for its field of view.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_wbc.crosslab import pbc_split, predict_crops
from napari_wbc.datasets import cached_lab_crops
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.files import load_network

SOURCE_FOV = 4.8
CACHE = Path("outputs/crosslab/cache")


def recut(crops: np.ndarray, fov: float, size: int = 128) -> np.ndarray:
    """Centre squares spanning ``fov`` red cells of crops spanning :data:`SOURCE_FOV`."""
    side = round(crops.shape[1] * fov / SOURCE_FOV)
    if side > crops.shape[1]:
        crops = pad_with_glass(crops, side)
    o = (crops.shape[1] - side) // 2
    x = torch.from_numpy(crops[:, o : o + side, o : o + side]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def pad_with_glass(crops: np.ndarray, side: int) -> np.ndarray:
    """Crops centred on a ``side`` square of their glass colour (median of the brightest 10 %)."""
    n, h, w, _ = crops.shape
    flat = crops.reshape(n, -1, 3).astype(np.int32)
    bright = flat.sum(-1) >= np.percentile(flat.sum(-1), 90, axis=1, keepdims=True)
    glass = np.stack([np.median(f[b], axis=0) for f, b in zip(flat, bright, strict=True)])
    out = np.empty((n, side, side, 3), np.uint8)
    out[:] = glass.round().astype(np.uint8)[:, None, None, :]
    oy, ox = (side - h) // 2, (side - w) // 2
    out[:, oy : oy + h, ox : ox + w] = crops
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--factors", type=float, nargs="+", default=[0.8, 1.0, 1.25])
    p.add_argument("--hedged", action="store_true", help="also the mean over 0.8×, 1×, 1.25×")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, config = load_network(args.model, cache=False)
    spec = config.spec
    classes = tuple(spec.classes)
    table, crops = cached_lab_crops("pbc", CACHE, 128, SOURCE_FOV, classes)
    _, va = pbc_split(table)
    crops = crops[va]
    y = np.array([classes.index(v) for v in table["label"].iloc[va]])
    from napari_wbc.prediction import UNSURE_SCALE_FACTORS

    probs: dict[float, np.ndarray] = {}

    def prob_at(k: float) -> np.ndarray:
        key = round(k, 4)
        if key not in probs:
            probs[key] = predict_crops(model, recut(crops, spec.fov_rbc * k), spec, d4=True)
        return probs[key]

    def f1_of(prob: np.ndarray) -> float:
        return float(classification_metrics(y, prob.argmax(1), classes)["macro_f1"])

    rows, hedged = {}, {}
    for k in args.factors:
        rows[k] = f1_of(prob_at(k))
        if args.hedged:
            views = [prob_at(k)] + [prob_at(k * f) for f in UNSURE_SCALE_FACTORS]
            hedged[k] = f1_of(np.mean(views, axis=0))
        print(k, rows[k], hedged.get(k), flush=True)
    print(f"{config.name}: PBC validation ({len(y)} crops, {len(classes)} classes, D4)")
    extra = " hedged (3 scales) | change |" if args.hedged else ""
    print("| field of view × | red cell measured | macro-F1 | change |" + extra)
    print("|---:|---|---:|---:|" + ("---:|---:|" if args.hedged else ""))
    for k, f1 in rows.items():
        off = "right" if k == 1 else f"{(k - 1) * 100:+.0f} %"
        line = f"| {k:.2f} | {off} | {f1:.3f} | {f1 - rows.get(1.0, f1):+.3f} |"
        if args.hedged:
            line += f" {hedged[k]:.3f} | {hedged[k] - rows.get(1.0, f1):+.3f} |"
        print(line)
    if args.json:
        out = {"model": config.name, "macro_f1": rows}
        if args.hedged:
            out["hedged_macro_f1"] = hedged
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
