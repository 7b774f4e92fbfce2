"""A whole slide, end to end: how long a user waits, and where the time goes (issue #15).

    python benchmarks/bench_slide.py [--size 20000] [--model auto] [--threads 2]
        [--compare-src /tmp/main-before/src] [--adapt] [--skip-exhaustive]

A synthetic smear at PBC's scale and white-cell density (0.1 µm/px,
``napari_wbc.synthetic.lazy_smear``), written once to a tiled pyramidal
TIFF as a scanner would (zlib; not timed), is read from that file and
classified by ``iter_classify_smear`` with the default settings (``--model auto``: routed per smear; doubt-gated TTA), then
with ``exhaustive=True`` (every D4 view of every member), each in a fresh
process: seconds, Mpx/s, cells/s, peak RSS, and the seconds per stage the
pipeline records (``df.attrs["seconds"]``), whose sum is compared with the
wall time.

``--compare-src`` runs the same smear with another checkout's ``src`` on the
Python path (e.g. ``git worktree add /tmp/main-before <commit>``) and its own
defaults (its built-in default model, its default TTA), in the same run.
``--adapt`` adapts the model to the smear's cells first, as the default does
for a smear ``--model auto`` hands to the three-lab model (e.g. ``--model
wbc-lite --adapt`` for a smear from another lab); the class counts are
printed with each run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def _render(size: int, path: str) -> float:
    """Write the synthetic smear to a tiled pyramidal TIFF once; seconds taken."""
    from napari_wbc.progress import run
    from napari_wbc.synthetic import lazy_smear
    from napari_wbc.tiff import iter_write_pyramid_tiff

    t = time.perf_counter()
    run(iter_write_pyramid_tiff(path, lazy_smear((size, size), seed=0, chunks=2048), 0.1))
    return time.perf_counter() - t


#: A detected cell within this distance (px, 4 µm) of a pasted cell's centre is that cell.
MATCH_PX = 40


def score(cells, truth_csv: str) -> dict:
    """Detection and classification of a slide's cells against ``real_cell_slide.py``'s truth."""
    import pandas as pd
    from scipy.spatial import cKDTree

    from napari_wbc.metrics import classification_metrics

    truth = pd.read_csv(truth_csv)
    if not len(cells):
        return {"recall": 0.0, "precision": 0.0}
    dist, idx = cKDTree(truth[["y", "x"]].to_numpy()).query(cells[["y", "x"]].to_numpy())
    hit = dist <= MATCH_PX
    matched = np.unique(idx[hit])
    classes = list(cells.attrs.get("classes") or sorted(set(truth["label"])))
    m = classification_metrics(
        truth["label"].to_numpy()[idx[hit]], cells["class"].to_numpy()[hit], classes
    )
    return {
        "recall": round(len(matched) / len(truth), 4),
        "precision": round(float(hit.mean()), 4),
        "accuracy": round(float(m["accuracy"]), 4),
        "macro_f1": round(float(m["macro_f1"]), 4),
        "f1": {c: round(float(v["f1"]), 3) for c, v in m["per_class"].items() if v["support"]},
    }


def _child(
    size: int,
    model: str,
    exhaustive: bool,
    threads: int,
    tiff: str,
    adapt: bool = False,
    truth: str | None = None,
) -> dict:
    from napari_wbc.images import read_smear
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.threads import configure_threads

    configure_threads(threads)
    try:
        from napari_wbc.routing import load_model
    except ImportError:  # a checkout from before --model auto: its own default
        from napari_wbc.inference import load_any
        from napari_wbc.models.files import default_model_path

        def load_model(name, device="cpu"):
            return load_any(default_model_path(), device)

    t0 = time.perf_counter()
    ensemble = load_model(model)
    load_s = time.perf_counter() - t0
    options = {"exhaustive": True} if exhaustive else {}
    if adapt:
        options["adapt"] = True
    config = ClassifyConfig(device="cpu", **options)
    t = time.perf_counter()
    smear = read_smear(tiff)  # the pixel size (0.1 µm) from the file
    try:
        cells = run(iter_classify_smear(smear, ensemble, config))
    finally:
        smear.close()
    seconds = time.perf_counter() - t
    scores = score(cells, truth) if truth else {}
    return {
        **scores,
        "seconds": seconds,
        "load_seconds": load_s,
        "cells": len(cells),
        "stages": cells.attrs.get("seconds", {}),
        "background": cells.attrs.get("seconds_background", {}),
        "model": cells.attrs.get("model", getattr(ensemble, "name", "")),
        "passes": float(cells["passes"].mean()) if "passes" in cells else None,
        "adapted_cells": cells.attrs.get("adapted_cells"),
        "counts": cells["class"].value_counts().to_dict(),
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _stage_table(runs, key: str, title: str, last: str = "") -> None:
    """Print the seconds per stage of ``r[key]`` for every run, one column each."""
    stages = sorted({k for _, r in runs for k in r.get(key, {})})
    if not stages:
        return
    print(f"\n{title}\n")
    print("| stage | " + " | ".join(name for name, _ in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for stage in stages:
        cells = [f"{r.get(key, {}).get(stage, 0):.1f}" for _, r in runs]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    if last:
        print(last)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--model", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compare-src", help="another checkout's src folder, run with its defaults")
    p.add_argument("--skip-exhaustive", action="store_true")
    p.add_argument(
        "--adapt",
        action="store_true",
        help="adapt the model to the smear's cells (as for a smear from another lab)",
    )
    p.add_argument("--json", default=None)
    p.add_argument(
        "--tiff",
        default=None,
        help="the smear as a tiled TIFF (written once if missing; default in the temp folder)",
    )
    p.add_argument(
        "--truth",
        default=None,
        help="the pasted cells of a real_cell_slide.py smear (its .csv): score each run",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import tempfile

    args.tiff = args.tiff or os.path.join(
        tempfile.gettempdir(), f"napari-wbc-slide-{args.size}.tif"
    )
    if args.case:
        exhaustive = args.case == "exhaustive"
        result = _child(
            args.size, args.model, exhaustive, args.threads, args.tiff, args.adapt, args.truth
        )
        print(json.dumps(result))
        return 0
    if args.truth and not os.path.exists(args.tiff):
        raise SystemExit(f"{args.tiff} is missing: write it with real_cell_slide.py first")
    if not os.path.exists(args.tiff):
        print(f"rendering the smear to {args.tiff}: {_render(args.size, args.tiff):.0f} s")

    def child(case: str, src: str | None = None) -> dict:
        env = dict(os.environ)
        if src:
            env["PYTHONPATH"] = src
        cmd = [sys.executable, __file__, "--case", case, "--size", str(args.size)]
        cmd += ["--model", args.model, "--threads", str(args.threads), "--tiff", args.tiff]
        cmd += ["--adapt"] if args.adapt else []
        cmd += ["--truth", args.truth] if args.truth else []
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    runs = []
    if args.compare_src:
        runs.append(("before (--compare-src, its defaults)", child("default", args.compare_src)))
        print(runs[-1], flush=True)
    runs.append((f"default ({args.model}{', adapted' if args.adapt else ''})", child("default")))
    print(runs[-1], flush=True)
    if not args.skip_exhaustive:
        runs.append(("exhaustive D4", child("exhaustive")))
        print(runs[-1], flush=True)

    mpx = args.size * args.size / 1e6
    print(f"\n{args.size} × {args.size} smear from a tiled TIFF ({mpx:.0f} Mpx, PBC scale), 2 cores, "
          f"{args.threads} threads\n")  # fmt: skip
    print("| run | model | cells | passes/cell | seconds | Mpx/s | cells/s | peak RSS (MB) "
          "| stages sum / wall |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in runs:
        staged = sum(r["stages"].values())
        passes = "" if r["passes"] is None else f"{r['passes']:.1f}"
        ratio = f"{staged / r['seconds']:.2f}" if r["stages"] else "n/a"
        print(
            f"| {name} | {r['model']} | {r['cells']} | {passes} | {r['seconds']:.0f} "
            f"| {mpx / r['seconds']:.2f} | {r['cells'] / r['seconds']:.1f} | {r['peak_mb']:.0f} "
            f"| {ratio} |"
        )
    if args.truth:
        print(f"\nAgainst the pasted cells ({args.truth}; matched within {MATCH_PX} px)\n")
        print("| run | detected (recall) | precision | accuracy | macro-F1 |")
        print("|---|---:|---:|---:|---:|")
        for name, r in runs:
            print(
                f"| {name} | {r.get('recall', 0):.3f} | {r.get('precision', 0):.3f} "
                f"| {r.get('accuracy', 0):.3f} | {r.get('macro_f1', 0):.3f} |"
            )
    wall = "| **wall** | " + " | ".join(f"**{r['seconds']:.1f}**" for _, r in runs) + " |"
    _stage_table(runs, "stages", "Seconds per stage", wall)
    _stage_table(
        runs, "background", "Seconds per stage on the background thread (overlapped with classify)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"size": args.size, "runs": runs}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
