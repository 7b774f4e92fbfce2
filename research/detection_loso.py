"""Choose detector settings leave-one-source-out, on every field of every source.

    python -m research.detection_loso [--out outputs/det-loso] [--defaults-only | --split-grid]

Loads every field of BCCD, TXL-Raabin and TXL-BCD (as ``benchmarks/
bench_detection.py labs --fields 0`` does), measures the red-cell scale of each
field once (cached in ``--out``), then runs the classical detector under each
candidate setting of the grid below and scores it against the white-cell
boxes. For each held-out source, the setting is chosen on the *other two*
sources only (the highest worst-source F1 there, ties to the smaller change
from today's defaults), and the held-out source's figures under that choice
are reported: a leave-one-source-out figure. Prints Markdown tables.

Settings are module constants of :mod:`napari_wbc.detection` and the scale
policy for a folder of fields (``field``: each field's own measurement;
``batch``: the median of the folder's measurements for every field;
``clip``: each field's own, kept within ±15 % of the folder's median).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

SOURCES = ("BCCD", "TXL-Raabin", "TXL-BCD")


def load(out: Path):
    from benchmarks.bench_detection import _load, load_sources

    from napari_wbc.scale import ScaleError, estimate_rbc_diameter
    from napari_wbc.settings import data_root

    sources = [s for s in load_sources(Path(data_root()), 0) if s.name in SOURCES]
    cache = out / "scales.json"
    scales = json.loads(cache.read_text()) if cache.exists() else {}
    fields = []
    for s in sources:
        for p in s.paths:
            key = str(p)
            img = _load(s, p)
            if key not in scales:
                try:
                    e = estimate_rbc_diameter(img)
                    scales[key] = [float(e.rbc_diameter_px), int(e.n_cells)]
                except ScaleError:
                    scales[key] = None
            boxes = s.wbc[s.wbc.path == key].reset_index(drop=True)
            fields.append((s.name, key, img, boxes))
        print(f"loaded {s.name}: {len(s.paths)} fields", file=sys.stderr)
    cache.write_text(json.dumps(scales))
    return fields, scales


def scale_of(policy: str, name: str, key: str, scales: dict, batch: dict) -> float:
    own = scales.get(key)
    if own is None or policy == "batch":
        return batch[name]
    if policy == "snap":  # napari_wbc.scale.folder_scales' rule, the folder being the source
        from napari_wbc.scale import FOLDER_OWN_SCALE_CELLS, FOLDER_OWN_SCALE_DIFFERENCE

        far = abs(own[0] / batch[name] - 1) > FOLDER_OWN_SCALE_DIFFERENCE
        return own[0] if own[1] >= FOLDER_OWN_SCALE_CELLS and far else batch[name]
    if policy == "clip":
        return float(np.clip(own[0], 0.85 * batch[name], 1.15 * batch[name]))
    return own[0]


def run_config(fields, scales, batch, policy: str, patch: dict, dedupe: bool = True) -> dict:
    import napari_wbc.detection as det_mod
    from napari_wbc.detection import dedupe_boxes, detect_cells, match_detections

    saved = {k: getattr(det_mod, k) for k in patch}
    for k, v in patch.items():
        setattr(det_mod, k, v)
    try:
        counts = {n: [0, 0, 0] for n in SOURCES}
        for name, key, img, boxes in fields:
            if dedupe:
                boxes = dedupe_boxes(boxes)
            d = scale_of(policy, name, key, scales, batch)
            found = detect_cells(img, rbc_diameter_px=d)
            found = found[found.kind == "wbc"].reset_index(drop=True)
            m = match_detections(found, boxes)
            c = counts[name]
            c[0] += m["tp"]
            c[1] += m["fp"]
            c[2] += m["fn"]
    finally:
        for k, v in saved.items():
            setattr(det_mod, k, v)
    out = {}
    for n, (tp, fp, fn) in counts.items():
        p = tp / max(tp + fp, 1)
        r = tp / max(tp + fn, 1)
        out[n] = {
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / max(p + r, 1e-9),
        }
    return out


GRID = {
    "_SPLIT_DIAMETER": [2.4, 2.2, 2.6, 2.8],
    "_SPLIT_DISTANCE": [1.2, 1.0, 1.4],
    "_MERGE_DISTANCE": [0.6, 0.5, 0.7, 0.8],
}
POLICIES = ["field", "clip", "batch", "snap"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/det-loso")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--defaults-only",
        action="store_true",
        help="only today's detector settings, under each scale policy",
    )
    ap.add_argument(
        "--split-grid",
        action="store_true",
        help="split settings under the folder ('snap') and one-field ('field') scales; each "
        "held-out source's choice maximizes the worst F1 over the other two and both scales",
    )
    args = ap.parse_args()
    import torch  # noqa: F401  (keeps thread settings consistent with the package)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields, scales = load(out)
    batch = {}
    for n in SOURCES:
        vals = [scales[k][0] for (s, k, _, _) in fields if s == n and scales.get(k)]
        batch[n] = float(np.median(vals))
    rows = []
    results_file = out / "grid-dedup.jsonl"
    done = set()
    if results_file.exists():
        for line in results_file.read_text().splitlines():
            r = json.loads(line)
            done.add(r["config"])
            rows.append(r)
    if args.split_grid:
        split_grid(fields, scales, batch, out)
        return
    grid = {k: v[:1] for k, v in GRID.items()} if args.defaults_only else GRID
    keys = list(grid)
    with results_file.open("a") as fh:
        for policy in POLICIES:
            for values in itertools.product(*(grid[k] for k in keys)):
                patch = dict(zip(keys, values, strict=True))
                name = (
                    policy
                    + " "
                    + " ".join(f"{k.strip('_').lower()}={v}" for k, v in patch.items())
                )
                if name in done:
                    continue
                t = time.perf_counter()
                res = run_config(fields, scales, batch, policy, patch)
                r = {
                    "config": name,
                    "policy": policy,
                    **patch,
                    "res": res,
                    "seconds": time.perf_counter() - t,
                }
                rows.append(r)
                fh.write(json.dumps(r) + "\n")
                fh.flush()
                print(
                    name,
                    {n: round(res[n]["f1"], 3) for n in SOURCES},
                    f"{r['seconds']:.0f}s",
                    file=sys.stderr,
                )
    report(rows)


def split_grid(fields, scales, batch, out: Path) -> None:
    """The split rule's settings, chosen leave one source out for any scale (see --split-grid)."""
    by = {}
    for split_d, split_dist in itertools.product([2.4, 2.8, 3.2, 99.0], [1.2, 1.5]):
        if split_d == 99.0 and split_dist == 1.5:
            continue  # 99: never split; the distance does not matter
        patch = {"_SPLIT_DIAMETER": split_d, "_SPLIT_DISTANCE": split_dist}
        by[(split_d, split_dist)] = {
            p: run_config(fields, scales, batch, p, patch) for p in ("snap", "field")
        }
        print(patch, file=sys.stderr, flush=True)
    (out / "split-grid.json").write_text(
        json.dumps([{"split": list(k), "res": v} for k, v in by.items()], indent=1)
    )
    print("| split diameter, distance (d) | scale | " + " | ".join(SOURCES) + " (F1) |")
    print("|---|---|" + "---:|" * len(SOURCES))
    for k, res in by.items():
        for p in ("snap", "field"):
            cells = " | ".join(f"{res[p][n]['f1']:.3f}" for n in SOURCES)
            print(f"| {k[0]:g}, {k[1]:g} | {p} | {cells} |")
    print()
    print(
        "| held out | chosen on the other two, both scales | held-out P / R, folder | one field |"
    )
    print("|---|---|---:|---:|")
    for held in SOURCES:
        others = [n for n in SOURCES if n != held]

        def worst(k, others=others):
            return min(by[k][p][n]["f1"] for p in ("snap", "field") for n in others)

        best = max(by, key=lambda k: (round(worst(k), 4), -(k[0] != 2.4) - (k[1] != 1.2)))
        f, o = by[best]["snap"][held], by[best]["field"][held]
        print(
            f"| {held} | {best[0]:g}, {best[1]:g} | {f['precision']:.3f} / {f['recall']:.3f} "
            f"| {o['precision']:.3f} / {o['recall']:.3f} |"
        )


def _distance(r: dict) -> float:
    """How far a setting is from today's defaults (ties go to the smaller change)."""
    base = {"_SPLIT_DIAMETER": 2.4, "_SPLIT_DISTANCE": 1.2, "_MERGE_DISTANCE": 0.6}
    return sum(abs(r[k] - v) / v for k, v in base.items()) + (r["policy"] != "field") * 0.01


def report(rows) -> None:
    print(
        "| held out | chosen on the other two (worst F1 there) | held-out precision | recall | F1 |"
    )
    print("|---|---|---:|---:|---:|")
    for held in SOURCES:
        others = [n for n in SOURCES if n != held]
        best = max(
            rows, key=lambda r: (round(min(r["res"][n]["f1"] for n in others), 4), -_distance(r))
        )
        h = best["res"][held]
        print(
            f"| {held} | {best['config']} | {h['precision']:.3f} | {h['recall']:.3f} | "
            f"{h['f1']:.3f} |"
        )
    print()
    print("| setting | " + " | ".join(f"{n} P / R" for n in SOURCES) + " |")
    print("|---|" + "---:|" * len(SOURCES))
    ranked = sorted(rows, key=lambda r: -min(r["res"][n]["f1"] for n in SOURCES))
    for r in ranked[:15]:
        cells = " | ".join(
            f"{r['res'][n]['precision']:.3f} / {r['res'][n]['recall']:.3f}" for n in SOURCES
        )
        print(f"| {r['config']} | {cells} |")


if __name__ == "__main__":
    main()
