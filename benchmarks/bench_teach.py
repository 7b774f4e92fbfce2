"""Teach a fold model its held-out lab from a few cells per class, then score the rest of it.

    python benchmarks/bench_teach.py outputs/crosslab --prefix in- --cells 0 1 3 5 10 --seeds 3

Protocol (issue #33). A fold model ``<root>/<prefix><lab>/model.safetensors``
(``napari-wbc train --labs ... --holdout <lab>``) never saw ``<lab>``. For
each number of cells per class and each seed, that many cells of every class
of the lab are drawn at random (seeded) and taught with
:func:`napari_wbc.teach.teach` (defaults; the replayed statistics are those
of the fold's own training labs); the model then classifies every other cell
of the lab with the eight D4 views. BCCD is scored on its four classes with
more than two cells (its two basophils are neither taught nor scored).

The refit time is the wall time of ``teach`` (features of the taught cells
under eight views, then the classifier refit), on the threads given.
Several roots make one ensemble of their fold models (one member each, e.g.
two training seeds): each member's classifier is refit on its own features
(``teach`` does this for every member), and the members' D4 probabilities
are averaged.

Nothing here changes the fold model or chooses anything on the lab scored.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_wbc.datasets import LABS, SHARED_CLASSES, cached_lab_crops, stratified_split
from napari_wbc.features import member_outputs
from napari_wbc.inference import load_any
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.build import classify_features
from napari_wbc.teach import TeachConfig, d4_views, teach
from napari_wbc.trust import FeatureStats

CACHE = Path("outputs/crosslab/cache")
REPLAY_PER_GROUP = 200


def view_features(ensemble, crops: np.ndarray) -> list[list[torch.Tensor]]:
    """Each member's features of every crop under each D4 view (``[member][view]``)."""
    outs = [member_outputs(ensemble, v)["features"] for v in d4_views(crops)]
    return [
        [torch.from_numpy(np.asarray(o[m], np.float32)) for o in outs]
        for m in range(len(ensemble.members))
    ]


@torch.no_grad()
def d4_probs(model, feats: list[torch.Tensor]) -> np.ndarray:
    return torch.stack([classify_features(model, f).softmax(1) for f in feats]).mean(0).numpy()


def ensemble_probs(ensemble, feats: list[list[torch.Tensor]], rows: np.ndarray) -> np.ndarray:
    """The members' D4 probabilities of ``rows`` (features from :func:`view_features`), averaged."""
    return np.mean(
        [d4_probs(m.model, [f[rows] for f in feats[i]]) for i, m in enumerate(ensemble.members)],
        axis=0,
    )


def replay_stats(
    ensemble, holdout: str, classes: tuple[str, ...], fov: float = 4.8
) -> list[FeatureStats]:
    """Each member's feature statistics of the fold's training labs (a class-balanced sample)."""
    rng = np.random.default_rng(0)
    feats: list[list[np.ndarray]] = [[] for _ in ensemble.members]
    labels = []
    for lab in LABS:
        if lab == holdout:
            continue
        table, crops = cached_lab_crops(lab, CACHE, 128, fov)
        if lab == "pbc":
            tr, _ = stratified_split(table["label"].tolist(), 0.2, seed=0)
            table, crops = table.iloc[tr], crops[tr]
        lab_labels = table["label"].to_numpy()
        for c in classes:
            rows = np.flatnonzero(lab_labels == c)
            pick = rng.choice(rows, size=min(REPLAY_PER_GROUP, len(rows)), replace=False)
            if len(pick):
                for m, f in enumerate(member_outputs(ensemble, crops[pick])["features"]):
                    feats[m].append(f)
                labels += [classes.index(c)] * len(pick)
    return [FeatureStats.fit(np.concatenate(f), np.asarray(labels), len(classes)) for f in feats]


def held_out_cells(model_file: Path | list[Path], lab: str):
    """A fold model (or several, as one ensemble) and the cells of ``lab`` it is scored on.

    Returns ``(ensemble, fov, table, crops, labels, y, scored)``: the model
    (D4), its field of view, the lab's rows and crops cut at it, their labels
    and class indices, and the classes with more than two cells (the only
    ones kept).
    """
    files = model_file if isinstance(model_file, list) else [model_file]
    ensemble = load_any(files[0], tta="d4")
    for extra in files[1:]:
        ensemble.members += load_any(extra, tta="d4").members
    classes = tuple(ensemble.classes)
    fov = round(ensemble.members[0].config.spec.fov_rbc, 2)
    table, crops = cached_lab_crops(lab, CACHE, 128, fov)
    labels = table["label"].to_numpy()
    scored = [c for c in classes if (labels == c).sum() > 2]
    keep = np.isin(labels, scored)
    table, crops, labels = table[keep], crops[keep], labels[keep]
    y = np.array([classes.index(v) for v in labels])
    return ensemble, fov, table, crops, labels, y, scored


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, nargs="+", help="one or more runs (their members pooled)")
    p.add_argument("--prefix", default="in-")
    p.add_argument("--labs", nargs="+", default=["raabin", "lisc", "bccd"])
    p.add_argument("--cells", nargs="+", type=int, default=[0, 1, 3, 5, 10])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--replay-share", type=float, default=TeachConfig.replay_share, help="TeachConfig's"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows, out = [], {}
    for lab in args.labs:
        model_file = [root / f"{args.prefix}{lab}" / "model.safetensors" for root in args.root]
        missing = [str(f) for f in model_file if not f.is_file()]
        if missing:
            print(f"{lab}: no fold model at {', '.join(missing)}; skipped")
            continue
        ensemble, fov, _, crops, labels, y, scored = held_out_cells(model_file, lab)
        classes = tuple(ensemble.classes)
        assert classes == SHARED_CLASSES, classes
        t0 = time.perf_counter()
        stats = replay_stats(ensemble, lab, classes, fov)
        feats = view_features(ensemble, crops)
        print(f"{lab}: {len(y)} cells, features in {time.perf_counter() - t0:.0f} s")
        out[lab] = {}
        for n in args.cells:
            scores, seconds = [], []
            for seed in range(args.seeds if n else 1):
                rng = np.random.default_rng([seed, n])
                taught = (
                    np.concatenate(
                        [
                            rng.choice(np.flatnonzero(labels == c), size=n, replace=False)
                            for c in scored
                        ]
                    )
                    if n
                    else np.zeros(0, int)
                )
                model = ensemble
                if n:
                    start = time.perf_counter()
                    config = TeachConfig(replay_share=args.replay_share)
                    model = teach(
                        ensemble, crops[taught], labels[taught], config=config, replay=stats
                    )
                    seconds.append(time.perf_counter() - start)
                rest = np.setdiff1d(np.arange(len(y)), taught)
                probs = ensemble_probs(model, feats, rest)
                m = classification_metrics(y[rest], probs.argmax(1), classes)
                f1 = [m["per_class"][c]["f1"] for c in scored]
                scores.append(float(np.mean(f1)))
            out[lab][n] = {"macro_f1": scores, "refit_s": seconds, "classes": scored}
            rows.append(
                (
                    lab,
                    n,
                    np.mean(scores),
                    min(scores),
                    max(scores),
                    np.median(seconds) if seconds else float("nan"),
                )
            )
            print(f"  {n:>2} per class: macro-F1 {np.mean(scores):.3f} {scores}")

    print(
        "\n| held-out lab | cells per class | macro-F1 (mean) | min – max over seeds | refit s |"
    )
    print("|---|---:|---:|---:|---:|")
    for lab, n, mean, lo, hi, sec in rows:
        print(f"| {lab} | {n} | {mean:.3f} | {lo:.3f} – {hi:.3f} | {sec:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
