"""Which field of view and input size do ImageNet features transfer best at? (issue #32)

    python -m research.fov_probe --fov 3.2 4.0 4.8 --size 96 128

A cheap proxy for choosing the cross-lab recipe without any held-out score:
the frozen ImageNet EfficientNet-Lite0 (``models.pretrained``) embeds every
lab's crops cut at ``fov`` red-cell diameters and resized to ``size``; a
logistic regression trained on some labs is scored (macro-F1) on another.

For the fold that holds out lab X the choice may use only the other three
labs, so the table reports, per fold, the mean over the "inner" transfers
among the three training labs (train on two, score the third). The held-out
lab's own transfer score is printed apart and must not be used to choose.
Results: docs/log/accuracy.md (2026-12-07).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_wbc.datasets import LABS, SHARED_CLASSES, cached_lab_crops
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.build import build_model, extract_features
from napari_wbc.models.registry import ModelSpec

CACHE = Path("outputs/crosslab/cache")
PER_CLASS = 300  # cells per class and lab at most (PBC and Raabin are large)


def lab_features(model, lab: str, fov: float, size: int, seed: int = 0):
    table, crops = cached_lab_crops(lab, CACHE, 128, fov)
    y = np.array([SHARED_CLASSES.index(v) for v in table["label"]])
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [rng.permutation(np.flatnonzero(y == k))[:PER_CLASS] for k in range(len(SHARED_CLASSES))]
    )
    feats = []
    with torch.no_grad():
        for s in range(0, len(keep), 128):
            x = torch.from_numpy(crops[keep[s : s + 128]]).permute(0, 3, 1, 2).float() / 255
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
            x = ((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)
            feats.append(extract_features(model, x))
    return torch.cat(feats), torch.from_numpy(y[keep])


def fit_score(train, test) -> float:
    """Class-balanced logistic regression (L2) on standardized features."""
    x = torch.cat([f for f, _ in train])
    y = torch.cat([t for _, t in train])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    w = torch.zeros(x.shape[1], len(SHARED_CLASSES), requires_grad=True)
    b = torch.zeros(len(SHARED_CLASSES), requires_grad=True)
    counts = torch.bincount(y, minlength=len(SHARED_CLASSES)).float()
    weight = counts.sum() / (len(counts) * counts.clamp(min=1))
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y, weight=weight) + 1e-3 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    xt, yt = test
    pred = (((xt - mu) / sd) @ w + b).argmax(1)
    m = classification_metrics(yt.numpy(), pred.numpy(), SHARED_CLASSES)
    present = [k for i, k in enumerate(SHARED_CLASSES) if int((yt == i).sum()) > 2]
    return float(np.mean([m["per_class"][k]["f1"] for k in present]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fov", type=float, nargs="+", default=[3.2, 4.0, 4.8])
    p.add_argument("--size", type=int, nargs="+", default=[96, 128])
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("-o", "--output", type=Path, default=Path("outputs/crosslab/fov-probe.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    results = {}
    for size in args.size:
        spec = ModelSpec(
            name="probe", arch=args.arch, input_size=size, classes=SHARED_CLASSES, pretrained=True
        )
        model, info = build_model(spec, pretrained=True)
        assert info.pretrained_loaded, info.message
        model = model.eval().to(memory_format=torch.channels_last)
        for fov in args.fov:
            feats = {lab: lab_features(model, lab, fov, size) for lab in LABS}
            transfer = {}
            for test in LABS:
                for n in (2, 3):
                    for train in itertools.combinations([la for la in LABS if la != test], n):
                        key = "+".join(train) + ">" + test
                        transfer[key] = fit_score([feats[la] for la in train], feats[test])
            row = {}
            for held in LABS:
                inner = [
                    v
                    for k, v in transfer.items()
                    if held not in k and len(k.split(">")[0].split("+")) == 2
                ]
                row[held] = {
                    "choose_on": float(np.mean(inner)),
                    "held_out": transfer["+".join(la for la in LABS if la != held) + ">" + held],
                }
            results[f"{size}px-fov{fov}"] = {"folds": row, "transfer": transfer}
            print(
                f"{size:4d} px  fov {fov:.1f}  "
                + "  ".join(
                    f"{h}: choose {r['choose_on']:.3f} (held {r['held_out']:.3f})"
                    for h, r in row.items()
                ),
                flush=True,
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
