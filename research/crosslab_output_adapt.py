"""Leave one lab out: label-free adaptation at the output, on cached D4 features (#12).

    python -m research.crosslab_output_adapt outputs/lolo5c-s0 outputs/lolo5c-s1 --cache outputs/oa5c

Each held-out lab's cells are read as ``evaluate`` reads them (scale measured,
times the field-of-view factor the *other* held-out lab chose, stain as the
fold models see it), and every fold model's pooled features of all eight D4
views are cached once. The methods are then compared on the cache:

- ``base``: the ensemble's mean probability over members and views (full D4).
- ``t3a``: the shipped prototype adaptation (napari_wbc.adapt, M = 50; the
  prototypes from the first view, as the product builds them), every view
  classified by them.
- ``+lame``: LAME (Boudiaf et al., CVPR 2022) on top of either: each cell's
  probabilities are pulled towards those of its k nearest cells of the same
  source (cosine, the members' D4-mean features, or the first member's
  first view) by fixed-point steps of z_i ∝ p_i · exp(Σ_j w_ij z_j); the
  affinity is symmetric kNN, k = 3, 5, 10 or 20 (5 is the paper's). No
  labels, no training, deterministic.

Nothing here is chosen on the lab it reports; the table gives every lab's
figure at every setting so that a choice made on one lab can be read off on
the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_crosslab import fold_ensemble
from benchmarks.bench_gate import lab_sets

from napari_wbc.adapt import PROTOTYPE_SUPPORT
from napari_wbc.bnfold import inference_model
from napari_wbc.metrics import classification_metrics
from napari_wbc.passes import to_input
from napari_wbc.progress import run
from napari_wbc.threads import configure_threads
from napari_wbc.trust import softmax
from napari_wbc.tta import TTA_SETS
from research.crosslab_t3a import prototype_weights

#: The field-of-view factor chosen on the other held-out lab (crosslab_zoom_adapt.py).
OTHER_LABS_K = {"lisc": 0.85, "bccd": 0.78}
NAMES = {"lisc": "LISC", "bccd": "BCCD"}


@torch.no_grad()
def cache_features(roots, lab: str, k: float, out: Path, sets, cells: str | None = None) -> Path:
    """Features (members, views, N, D), head weights and labels of ``lab``'s cells.

    ``cells``: another set's name in ``sets`` to classify with ``lab``'s fold
    models instead (PBC validation: a lab they were trained on).
    """
    cells = cells or NAMES[lab]
    path = out / f"{lab}-{cells.split()[0].lower()}-k{k:.2f}.npz"
    if path.exists():
        return path
    ensemble = fold_ensemble(roots, lab)
    table = sets[cells]
    paths = table["path"].astype(str).tolist()
    pre = ensemble.preprocessor
    found = pre.resolve_crop_scale(paths, "measure")
    crops = run(pre.iter_read_crop_files(paths, "auto", found.rbc_diameter_px * k))
    feats, weights, biases = [], [], []
    for member in ensemble.members:
        spec = member.config.spec
        x = to_input(crops, spec.input_size, torch.device("cpu"))
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        net = inference_model(member.model)
        views = []
        for t in TTA_SETS["d4"]:
            f = [
                net.forward_head(net.forward_features(t(x[s : s + 64])), pre_logits=True)
                for s in range(0, len(x), 64)
            ]
            views.append(torch.cat(f).float().numpy())
        feats.append(np.stack(views))
        head = member.model.get_classifier()
        weights.append(head.weight.detach().float().numpy())
        biases.append(head.bias.detach().float().numpy())
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        features=np.stack(feats).astype(np.float32),
        weights=np.stack(weights),
        biases=np.stack(biases),
        labels=np.array(table["label"].astype(str).tolist(), dtype="U"),
        classes=np.array(list(ensemble.classes), dtype="U"),
        rbc=found.rbc_diameter_px,
    )
    return path


def t3a_probs(features, weights, biases, support=PROTOTYPE_SUPPORT) -> np.ndarray:
    """Per member and view probabilities after prototype adaptation (M, V, N, C).

    The prototypes come from each member's first view, as the product builds them.
    """
    out = []
    for f, w, b in zip(features, weights, biases, strict=True):
        first = f[0].astype(np.float64)
        head = prototype_weights(first, first @ w.T + b, w.astype(np.float64), support)
        out.append(softmax(f.astype(np.float64) @ head.T))
    return np.stack(out)


def base_probs(features, weights, biases) -> np.ndarray:
    return np.stack(
        [
            softmax(f.astype(np.float64) @ w.T + b)
            for f, w, b in zip(features, weights, biases, strict=True)
        ]
    )


def lame(probs: np.ndarray, feats: np.ndarray, knn: int = 5, steps: int = 10) -> np.ndarray:
    """LAME's fixed point: z_i ∝ p_i exp(Σ_j w_ij z_j), w the symmetric kNN affinity."""
    z = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1)[:, :knn]
    w = np.zeros_like(sim)
    rows = np.repeat(np.arange(len(z)), knn)
    w[rows, nn.ravel()] = 1.0
    w = (w + w.T) / 2
    logp = np.log(np.maximum(probs, 1e-12))
    y = probs.copy()
    for _ in range(steps):
        y = softmax(logp + w @ y)
    return y


def score(labels, probs, classes) -> dict:
    m = classification_metrics(list(labels), probs.argmax(1), list(classes))
    return {
        "macro_f1": round(m["macro_f1"], 4),
        "per_class_f1": {c: round(v["f1"], 3) for c, v in m["per_class"].items()},
    }


def methods(data) -> dict[str, np.ndarray]:
    f, w, b = data["features"], data["weights"], data["biases"]
    base = base_probs(f, w, b)  # (M, V, N, C)
    t3a = t3a_probs(f, w, b)
    # Affinity features: each member's D4-mean unit features, concatenated.
    unit = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    aff = np.concatenate(list(unit.mean(axis=1)), axis=1)
    first = unit[0, 0]  # the cheapest member's first view: what the gate has for every cell
    out = {
        "base, no TTA": base[:, 0].mean(0),
        "base, D4": base.mean((0, 1)),
        "t3a, no TTA": t3a[:, 0].mean(0),
        "t3a, D4": t3a.mean((0, 1)),
    }
    for name in ("base, D4", "t3a, D4"):
        for knn in (3, 5, 10):
            out[f"{name} + lame k={knn}"] = lame(out[name], aff, knn=knn)
        for knn in (5, 10, 20):
            out[f"{name} + lame k={knn}, member 0 view 0"] = lame(out[name], first, knn=knn)
    return out


def rare_rows(data, lab: str, cells: int, draws: int = 20) -> list[dict]:
    """Each class made rare: ``cells`` of its cells (seeded draws) among every cell of the others.

    In a blood smear most classes are rare (basophils under 1 %, eosinophils
    and monocytes a few %), unlike the near-balanced held-out sets. The
    recall of the rare class, as is, with prototypes and with prototypes and
    neighbours (k = 10), averaged over the draws.
    """
    labels, classes = data["labels"], [str(c) for c in data["classes"]]
    f, w, b = data["features"], data["weights"], data["biases"]
    rng = np.random.default_rng(0)
    rows = []
    for rare in sorted(set(labels)):
        if (labels == rare).sum() < 2 * cells:  # too few to draw from
            continue
        others = np.flatnonzero(labels != rare)
        found = {"none": [], "t3a": [], "t3a + lame": []}
        for _ in range(draws):
            pick = np.sort(
                np.concatenate([others, rng.choice(np.flatnonzero(labels == rare), cells, False)])
            )
            fp, is_rare = f[:, :, pick], labels[pick] == rare
            unit = fp / np.maximum(np.linalg.norm(fp, axis=-1, keepdims=True), 1e-12)
            t3a = t3a_probs(fp, w, b).mean((0, 1))
            answers = {
                "none": base_probs(fp, w, b).mean((0, 1)),
                "t3a": t3a,
                "t3a + lame": lame(t3a, np.concatenate(list(unit.mean(axis=1)), axis=1), knn=10),
            }
            for name, probs in answers.items():
                pred = np.array(classes)[probs[is_rare].argmax(1)]
                found[name].append(float((pred == rare).mean()))
        row = {"lab": lab, "rare": str(rare), "cells": cells, "of": len(others) + cells}
        row.update({f"recall {k}": round(float(np.mean(v)), 3) for k, v in found.items()})
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--labs", nargs="+", choices=("bccd", "lisc"), default=("bccd", "lisc"))
    p.add_argument(
        "--pbc",
        action="store_true",
        help="also PBC validation through each fold's models (in-lab)",
    )
    p.add_argument("--classes", nargs="*", default=None, help="restrict the answer to these")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--rare",
        type=int,
        nargs="*",
        default=(),
        help="also make each class rare: this many of its cells among all the others",
    )
    args = p.parse_args(argv)
    configure_threads(args.threads)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    rows = []
    runs = [(lab, None) for lab in args.labs]
    if args.pbc:
        runs += [(lab, "PBC validation") for lab in args.labs]
    for lab, cells in runs:
        path = cache_features(args.roots, lab, OTHER_LABS_K[lab], args.cache, sets, cells)
        if cells:
            lab = f"pbc@{lab}"
        data = dict(np.load(path, allow_pickle=False))
        classes = [str(c) for c in data["classes"]]
        known = np.isin(data["labels"], classes)  # PBC's cells of classes a 5-class model lacks
        data["features"] = data["features"][:, :, known]
        data["labels"] = data["labels"][known]
        if args.classes:
            keep = [classes.index(c) for c in args.classes]
            data["weights"] = data["weights"][:, keep]
            data["biases"] = data["biases"][:, keep]
            classes = list(args.classes)
        for name, probs in methods(data).items():
            row = {"lab": lab, "method": name, **score(data["labels"], probs, classes)}
            rows.append(row)
            print(f"{lab:9s} {name:45s} {row['macro_f1']:.4f}  {row['per_class_f1']}", flush=True)
        if not cells:
            for n in args.rare:
                rows += rare_rows(data, lab, n)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
