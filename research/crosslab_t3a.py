"""Label-free prototype adjustment (T3A) on the leave-one-lab-out fold models (issue #12).

    python -m research.crosslab_t3a outputs/lolo8c

T3A (Iwasawa & Matsuo, NeurIPS 2021): each class's prototype starts as the
classifier's own weight vector; the held-out lab's cells, pseudo-labelled
by the model, join the prototype of their predicted class, keeping only the
M least uncertain cells per class (lowest entropy); cells are then
classified by cosine similarity to the prototypes. No label of the held-out
lab is read. M is the one setting: chosen on the *other* held-out lab, as
the protocol asks, and every M is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_crosslab import Rows, score, to_input

from napari_wbc.datasets import cached_lab_crops
from napari_wbc.models.files import load_network

SUPPORTS = (1, 5, 10, 20, 50, 100, 1_000_000)


@torch.no_grad()
def features_and_logits(model, x, tta: bool, batch: int = 128):
    model.eval()
    views = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
    feats, logits = [], []
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        fsum, lsum = 0, 0
        for k, flip in views:
            v = torch.rot90(xb, k, dims=(2, 3))
            v = torch.flip(v, dims=(3,)) if flip else v
            pre = model.forward_head(model.forward_features(v), pre_logits=True)
            fsum = fsum + pre
            lsum = lsum + model.get_classifier()(pre)
        feats.append(fsum / len(views))
        logits.append(lsum / len(views))
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def t3a(features, logits, weights, m: int):
    """Class indices by cosine similarity to prototypes of the M surest cells per class."""
    return (features @ prototype_weights(features, logits, weights, m).T).argmax(1)


def adapted_probs(features, logits, weights, m: int):
    """Probabilities of the prototype classifier as a linear layer (what an adapted model computes).

    Prototypes (unit length) scaled to the classifier's mean weight norm, no
    bias: its argmax is T3A's cosine one.
    """
    out = features @ prototype_weights(features, logits, weights, m).T
    out = np.exp(out - out.max(1, keepdims=True))
    return out / out.sum(1, keepdims=True)


def ensemble_rows(roots, supports=(0, 20, 50, 100)):
    """Fold models of the same held-out lab from several roots, averaged; PBC validation too."""
    from collections import defaultdict

    from napari_wbc.datasets import stratified_split
    from napari_wbc.models.registry import PBC_CLASSES

    folds = defaultdict(list)
    for root in roots:
        for file in sorted(root.glob("*-*/model.safetensors")):
            model, config = load_network(file, cache=False)
            folds[config.training.get("holdout")].append((model, config))
    rows = Rows()
    for lab, members in folds.items():
        classes = tuple(members[0][1].spec.classes)
        sets = {lab: cached_lab_crops(lab, "outputs/crosslab/cache", 128, 4.8)}
        table, crops = cached_lab_crops("pbc", "outputs/crosslab/cache", 128, 4.8, PBC_CLASSES)
        _, val = stratified_split(table["label"].tolist(), 0.2, seed=0)
        sets["pbc validation"] = (table.iloc[val].reset_index(drop=True), crops[val])
        for name, (tab, cr) in sets.items():
            labels = tab["label"].tolist()
            for tta in (False, True):
                outs = [
                    features_and_logits(model, to_input(cr, config), tta)
                    for model, config in members
                ]
                row = {"fold": lab, "test": name, "tta": tta, "members": len(members)}
                for m in supports:
                    probs = []
                    for (model, _), (f, lg) in zip(members, outs, strict=True):
                        w = model.get_classifier().weight.detach().numpy()
                        if m == 0:
                            e = np.exp(lg - lg.max(1, keepdims=True))
                            probs.append(e / e.sum(1, keepdims=True))
                        else:
                            probs.append(adapted_probs(f, lg, w, m))
                    row["base" if m == 0 else str(m)] = score(np.mean(probs, 0), labels, classes)[
                        "macro_f1"
                    ]
                rows.add(row)
    return rows


def cells_rows(root: Path, sizes=(8, 16, 32, 64, 128, 192, 256), draws: int = 5, m: int = 50):
    """Prototypes from a few random cells of the held-out lab, scored on all of its cells."""
    rows = Rows()
    for file in sorted(root.glob("*-*/model.safetensors")):
        model, config = load_network(file, cache=False)
        lab = config.training.get("holdout")
        classes = tuple(config.spec.classes)
        table, crops = cached_lab_crops(lab, "outputs/crosslab/cache", 128, 4.8)
        labels = table["label"].tolist()
        f, lg = features_and_logits(model, to_input(crops, config), False)
        w = model.get_classifier().weight.detach().numpy()
        onehot = np.eye(len(classes))
        row = {"lab": lab, "base": score(onehot[lg.argmax(1)], labels, classes)["macro_f1"]}
        for size in sizes:
            scores = []
            for draw in range(draws):
                pick = np.random.default_rng(draw).choice(len(f), size, replace=False)
                adapted = prototype_weights(f[pick], lg[pick], w, m)
                scores.append(
                    score(onehot[(f @ adapted.T).argmax(1)], labels, classes)["macro_f1"]
                )
            row[str(size)] = [round(x, 3) for x in scores]
        rows.add(row)
    return rows


def prototype_weights(features, logits, weights, m: int) -> np.ndarray:
    """The adapted classifier's weights (prototypes at the mean weight norm), as the product's."""
    z = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    w = weights / np.maximum(np.linalg.norm(weights, axis=1, keepdims=True), 1e-12)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(1)
    pred = logits.argmax(1)
    protos = []
    for k in range(len(w)):
        idx = np.flatnonzero(pred == k)
        idx = idx[np.argsort(entropy[idx], kind="stable")[:m]]
        proto = w[k] + z[idx].sum(0)
        protos.append(proto / max(np.linalg.norm(proto), 1e-12))
    return np.stack(protos) * float(np.linalg.norm(weights, axis=1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cells", action="store_true", help="adapt on a few random cells instead")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.cells:
        rows = cells_rows(args.root[0])
        rows.file = args.json
        rows.save()
        return 0
    if len(args.root) > 1:
        rows = ensemble_rows(args.root)
        rows.file = args.json
        rows.save()
        return 0
    rows = Rows(args.json)
    for file in sorted(args.root[0].glob("*-*/model.safetensors")):
        model, config = load_network(file, cache=False)
        lab = config.training.get("holdout")
        classes = tuple(config.spec.classes)
        table, crops = cached_lab_crops(lab, "outputs/crosslab/cache", 128, 4.8)
        labels = table["label"].tolist()
        weights = model.get_classifier().weight.detach().numpy()
        for tta in (False, True):
            f, lg = features_and_logits(model, to_input(crops, config), tta)
            onehot = np.eye(len(classes))
            base = score(onehot[lg.argmax(1)], labels, classes)
            row = {"lab": lab, "model": file.parent.name, "tta": tta, "base": base["macro_f1"]}
            for m in SUPPORTS:
                row[str(m)] = score(onehot[t3a(f, lg, weights, m)], labels, classes)["macro_f1"]
            rows.add(row)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
