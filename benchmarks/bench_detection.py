"""Benchmark white-cell detection: accuracy across labs, and speed on a large smear.

    python benchmarks/bench_detection.py labs [--fields 60] [--images docs/images]
    python benchmarks/bench_detection.py speed [--size 20000] [--chunk 512] [--block 2048]

``labs`` scores detection on smear fields of every source with white-cell
boxes: BCCD (``bccd/boxes.csv``), TXL-Raabin and TXL-BCD (``txl/boxes.csv``,
label ``wbc``, by ``source``) and the synthetic sample smear with its truth.
Each source is run three times: with the scale given (the median of the
source's whole red-cell boxes, as a user giving the microscope's pixel size),
with the scale measured as ``napari-wbc classify`` does for a folder (every
field measured, then the folder's median for each, except a field clearly at
another magnification: :func:`napari_wbc.scale.folder_scales`), and with each
field's own measurement (as for one image alone; the folder's median where a
field cannot be measured). A detection is right when its centre lies in a
white-cell box (:func:`napari_wbc.detection.match_detections`, one to one); a
cell boxed twice (boxes overlapping by IoU ≥ 0.5,
:func:`napari_wbc.detection.dedupe_boxes`) counts once, and the recall against
every box is printed too. The red-cell scale is also scored: its ratio to the red-cell
boxes' median, per source and per field. With ``--images`` it draws, per
source, the fields with the most errors: green boxes found, red boxes missed,
magenta crosses false detections. The data folder is
:func:`napari_wbc.settings.data_root`; sources that are absent are skipped.

``speed`` times tiled detection on a large lazy synthetic smear. Each row runs
in a fresh process so its peak memory (max RSS) is its own. The image is
rendered lazily chunk by chunk, so the input never sits in memory whole;
"generate only" is the cost of rendering it once, which reading a file would
replace. Detection reads every block with a halo, so it renders some pixels
more than once: the table says how many pixels it read.

Both print Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

# ------------------------------------------------------------------ labs


@dataclass
class Source:
    """Fields of one lab: image paths, white-cell and whole red-cell boxes."""

    name: str
    paths: list  # of Path, or arrays for the synthetic sample
    wbc: pd.DataFrame  # path, x, y, w, h
    rbc: pd.DataFrame  # path, x, y, w, h (whole boxes only)
    images: dict = field(default_factory=dict)  # in-memory images by path


def _whole(boxes: pd.DataFrame, sizes: dict) -> pd.DataFrame:
    """Boxes not touching their image's border: cut cells do not show their size."""
    h = boxes.path.map(lambda p: sizes[p][0])
    w = boxes.path.map(lambda p: sizes[p][1])
    inside = (
        (boxes.x > 2) & (boxes.y > 2) & (boxes.x + boxes.w < w - 2) & (boxes.y + boxes.h < h - 2)
    )
    return boxes[inside]


def _image_sizes(root: Path, paths) -> dict:
    from PIL import Image

    sizes = {}
    for p in paths:
        with Image.open(root / p) as im:
            sizes[p] = (im.height, im.width)
    return sizes


def _pick(paths, n: int) -> list:
    """Every k-th of the sorted paths, ``n`` in all (all when n is 0)."""
    paths = sorted(paths)
    if not n or n >= len(paths):
        return paths
    return [paths[i] for i in np.linspace(0, len(paths) - 1, n).round().astype(int)]


def load_sources(root: Path, n_fields: int, only=None) -> list[Source]:
    """The sources present under ``root`` (and the synthetic sample), ``n_fields`` each."""
    sources = []
    bccd = root / "bccd" / "boxes.csv"
    if bccd.exists():
        boxes = pd.read_csv(bccd)
        paths = _pick(boxes.path.unique(), n_fields)
        boxes = boxes[boxes.path.isin(paths)]
        sizes = _image_sizes(root / "bccd", paths)
        sources.append(
            Source(
                "BCCD",
                [root / "bccd" / p for p in paths],
                boxes[boxes.label == "WBC"].assign(
                    path=lambda b: b.path.map(lambda p: str(root / "bccd" / p))
                ),
                _whole(boxes[boxes.label == "RBC"], sizes).assign(
                    path=lambda b: b.path.map(lambda p: str(root / "bccd" / p))
                ),
            )
        )
    txl = root / "txl" / "boxes.csv"
    if txl.exists():
        boxes = pd.read_csv(txl)
        for src, name in (("raabin", "TXL-Raabin"), ("bcd", "TXL-BCD")):
            part = boxes[boxes.source == src]
            paths = _pick(part.path.unique(), n_fields)
            part = part[part.path.isin(paths)]
            sizes = _image_sizes(root / "txl", paths)
            folder = root / "txl"

            def full(b, folder=folder):
                return b.path.map(lambda rel: str(folder / rel))

            sources.append(
                Source(
                    name,
                    [root / "txl" / p for p in paths],
                    part[part.label == "wbc"].assign(path=full),
                    _whole(part[part.label == "rbc"], sizes).assign(path=full),
                )
            )
    from napari_wbc.synthetic import make_sample_smear, sample_smear_truth

    truth = sample_smear_truth()

    def as_boxes(t: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "path": "synthetic sample",
                "x": t.x - t.diameter / 2,
                "y": t.y - t.diameter / 2,
                "w": t.diameter,
                "h": t.diameter,
            }
        )

    sources.append(
        Source(
            "synthetic sample",
            ["synthetic sample"],
            as_boxes(truth[truth.kind == "wbc"]),
            as_boxes(truth[truth.kind == "rbc"]),
            images={"synthetic sample": make_sample_smear()},
        )
    )
    if only:
        sources = [s for s in sources if s.name in only]
    return sources


def _load(source: Source, path) -> np.ndarray:
    from PIL import Image

    if str(path) in source.images:
        return source.images[str(path)]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def box_diameter(boxes: pd.DataFrame) -> pd.Series:
    """Diameter of a cell from its box: the mean of its sides."""
    return (boxes.w + boxes.h) / 2


def _detect(image, rbc_diameter_px: float, detector: str | None) -> pd.DataFrame:
    from napari_wbc.detection import detect_cells

    if detector is None:
        det = detect_cells(image, rbc_diameter_px=rbc_diameter_px)
    else:
        det = detect_cells(image, rbc_diameter_px=rbc_diameter_px, detector=detector)
    return det[det.kind == "wbc"]


def _measure_scales(source: Source, images: dict) -> dict:
    """Measured red-cell estimate per field (None where it cannot be measured)."""
    from napari_wbc.scale import ScaleError, estimate_rbc_diameter

    out = {}
    for p in source.paths:
        try:
            out[str(p)] = estimate_rbc_diameter(images[str(p)])
        except ScaleError:
            out[str(p)] = None
    return out


#: Scale modes: the red-cell boxes' median (a user giving the pixel size), the
#: folder's measured scale (napari-wbc classify on a folder), each field's own
#: measurement (the widget on one image; the folder median where it fails).
MODES = ("given", "measured", "each field")


def score_source(source: Source, detector: str | None = None) -> dict:
    """Detection and scale figures of one source; also keeps per-field errors for pictures."""
    from napari_wbc.detection import dedupe_boxes, detection_scores
    from napari_wbc.scale import folder_scales

    images = {str(p): _load(source, p) for p in source.paths}
    given = float(box_diameter(source.rbc).median())
    t = time.perf_counter()
    estimates = _measure_scales(source, images)
    scale_seconds = time.perf_counter() - t
    folder = folder_scales(estimates)
    ok = [e.rbc_diameter_px for e in estimates.values() if e is not None]
    batch = float(np.median(ok)) if ok else given
    result = {
        "source": source.name,
        "fields": len(images),
        "wbc": len(source.wbc),
        "rbc_box": given,
    }
    # Scale: per source (the batch's median) and per field against the field's own boxes.
    per_field = (
        source.rbc.assign(d=box_diameter(source.rbc)).groupby("path").d.agg(["median", "size"])
    )
    ratios = [
        estimates[p].rbc_diameter_px / row["median"]
        for p, row in per_field.iterrows()
        if row["size"] >= 3 and estimates.get(p) is not None
    ]
    used = [folder[p].rbc_diameter_px for p in images if p in folder]
    result.update(
        measured_fields=len(ok),
        rbc_measured=float(np.median(ok)) if ok else float("nan"),
        batch_ratio=(float(np.median(ok)) / given) if ok else float("nan"),
        field_within_10=float(np.mean(np.abs(np.asarray(ratios) - 1) <= 0.10))
        if ratios
        else float("nan"),
        field_ratio_median=float(np.median(ratios)) if ratios else float("nan"),
        own_scale_fields=sum(abs(u - batch) > 1e-6 for u in used),
        scale_seconds=scale_seconds,
    )
    errors = []
    for mode in MODES:
        tp = fp = fn = raw_fn = 0
        t = time.perf_counter()
        for p, img in images.items():
            if mode == "given":
                d = given
            elif mode == "measured":
                d = folder[p].rbc_diameter_px if p in folder else given
            else:
                d = estimates[p].rbc_diameter_px if estimates[p] is not None else batch
            det = _detect(img, d, detector).reset_index(drop=True)
            every_box = source.wbc[source.wbc.path == p].reset_index(drop=True)
            # A cell boxed twice counts once (dedupe_boxes); raw_fn keeps every box.
            boxes = dedupe_boxes(every_box)
            m = match_detections(det, boxes)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
            raw_fn += len(every_box) - m["tp"]
            if mode == "measured" and (m["fp"] or m["fn"]):
                errors.append((p, img, det, boxes, m["pairs"], d))
        seconds = time.perf_counter() - t
        result[mode] = {
            **detection_scores(tp, fp, fn),
            "cells": tp + fn,
            "recall_every_box": tp / (tp + raw_fn) if tp + raw_fn else 1.0,
            "seconds_per_field": seconds / len(images),
        }
    result["errors"] = errors
    return result


def match_detections(det, boxes):
    from napari_wbc.detection import match_detections as match

    return match(det, boxes)


def draw_errors(result: dict, out: Path, thumb: int = 320, most: int = 8) -> Path | None:
    """A strip of the fields with the most errors: found (green), missed (red), false (magenta)."""
    from PIL import Image, ImageDraw

    errors = sorted(
        result["errors"],
        key=lambda e: -(len(e[2]) + len(e[3]) - 2 * len(e[4])),
    )[:most]
    if not errors:
        return None
    tiles = []
    for _path, img, det, boxes, pairs, d in errors:
        scale = thumb / max(img.shape[:2])
        im = Image.fromarray(img).resize(
            (round(img.shape[1] * scale), round(img.shape[0] * scale)), Image.BILINEAR
        )
        draw = ImageDraw.Draw(im)
        found_d = {i for i, _ in pairs}
        found_b = {j for _, j in pairs}
        for j, b in boxes.iterrows():
            colour = (0, 200, 0) if j in found_b else (255, 0, 0)
            x0, y0 = b.x * scale, b.y * scale
            draw.rectangle((x0, y0, x0 + b.w * scale, y0 + b.h * scale), outline=colour, width=3)
        for i, r in det.iterrows():
            x, y = r.x * scale, r.y * scale
            if i in found_d:
                draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(0, 200, 0))
            else:
                s = 10
                draw.line((x - s, y - s, x + s, y + s), fill=(255, 0, 255), width=4)
                draw.line((x - s, y + s, x + s, y - s), fill=(255, 0, 255), width=4)
        # The scale used, as a red-cell-sized bar in the corner.
        draw.rectangle((4, 4, 4 + d * scale, 10), fill=(0, 0, 0))
        canvas = Image.new("RGB", (thumb, thumb), (255, 255, 255))
        canvas.paste(im, (0, 0))
        tiles.append(np.asarray(canvas))
    cols = min(4, len(tiles))
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[i : i + cols], axis=1) for i in range(0, len(tiles), cols)]
    slug = result["source"].lower().replace(" ", "-")
    path = out / f"detection-{slug}.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, optimize=True)
    return path


def run_labs(args) -> None:
    from napari_wbc.settings import data_root

    root = Path(args.data or data_root())
    sources = load_sources(root, args.fields, args.source)
    print(
        f"Data: {root}; up to {args.fields or 'all'} fields per source; detector {args.detector or 'default'}\n"
    )
    results = [score_source(s, args.detector) for s in sources]
    print(
        "| source | fields | white cells (boxes) | scale | precision | recall | F1 "
        "| recall, every box | s/field |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        for mode in MODES:
            m = r[mode]
            print(
                f"| {r['source']} | {r['fields']} | {m['cells']} ({r['wbc']}) | {mode} "
                f"| {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} "
                f"| {m['recall_every_box']:.3f} | {m['seconds_per_field']:.2f} |"
            )
    print()
    print(
        "| source | red cell, boxes' median (px) | measured, batch median (px) | ratio "
        "| fields measured | fields within 10 % of their boxes | fields at their own scale "
        "| s/field |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['source']} | {r['rbc_box']:.1f} | {r['rbc_measured']:.1f} | {r['batch_ratio']:.3f} "
            f"| {r['measured_fields']}/{r['fields']} | {r['field_within_10']:.2f} "
            f"| {r['own_scale_fields']} | {r['scale_seconds'] / r['fields']:.2f} |"
        )
    if args.images:
        out = Path(args.images)
        out.mkdir(parents=True, exist_ok=True)
        print()
        for r in results:
            path = draw_errors(r, out)
            if path:
                print(f"errors of {r['source']}: {path}")
    if args.json:
        Path(args.json).write_text(
            json.dumps([{k: v for k, v in r.items() if k != "errors"} for r in results], indent=1)
        )


# ----------------------------------------------------------------- speed


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_generate(size: int, chunk: int, block: int) -> dict:
    import dask

    from napari_wbc.synthetic import lazy_smear

    img = lazy_smear((size, size), seed=0, chunks=chunk)
    t = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=2):
        img.mean(axis=(0, 1)).compute()
    return {"seconds": time.perf_counter() - t}


def _case_detect(size: int, chunk: int, block: int, known_scale: bool) -> dict:
    import dask

    import napari_wbc.detection as detection
    from napari_wbc.synthetic import lazy_smear, smear_truth

    img = lazy_smear((size, size), seed=0, chunks=chunk)
    read = {"pixels": 0}
    original = detection.read_window

    def counting(image, box):
        y0, y1, x0, x1 = box
        read["pixels"] += (y1 - y0) * (x1 - x0)
        return original(image, box)

    detection.read_window = counting
    t = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=2):
        det = detection.detect_cells(
            img, rbc_diameter_px=75.0 if known_scale else None, block=block
        )
    seconds = time.perf_counter() - t
    truth = smear_truth((size, size), seed=0)
    return {
        "seconds": seconds,
        "cells": int((det.kind == "wbc").sum()),
        "true_cells": int((truth.kind == "wbc").sum()),
        "read_pixels": read["pixels"],
    }


CASES = {
    "generate": case_generate,
    "detect_known": lambda s, c, b: _case_detect(s, c, b, known_scale=True),
    "detect_estimated": lambda s, c, b: _case_detect(s, c, b, known_scale=False),
}


def run_speed(args) -> None:
    if args.case:
        result = CASES[args.case](args.size, args.chunk, args.block)
        result["peak_mb"] = _peak_mb()
        print(json.dumps(result))
        return

    def child(case: str) -> dict:
        cmd = [sys.executable, __file__, "speed", "--case", case, "--size", str(args.size)]
        cmd += ["--chunk", str(args.chunk), "--block", str(args.block)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    mpx = args.size * args.size / 1e6
    gen = child("generate")
    gen_rate = mpx / gen["seconds"]  # Mpx rendered per second
    rows = [
        (
            "generate synthetic smear only (baseline)",
            gen["seconds"],
            mpx / gen["seconds"],
            "",
            gen["peak_mb"],
            "",
        )
    ]
    for case, label in (
        ("detect_known", "detect_cells, scale given (75 px)"),
        ("detect_estimated", "detect_cells, scale measured"),
    ):
        r = child(case)
        # Rendering the pixels it read is the input's cost, not detection's.
        render = r["read_pixels"] / 1e6 / gen_rate
        net = max(r["seconds"] - render, 1e-9)
        note = (
            f"{r['cells']} cells found, {r['true_cells']} in truth; "
            f"read {r['read_pixels'] / 1e6 / mpx:.2f}× the image"
        )
        rows.append(
            (label, r["seconds"], mpx / r["seconds"], f"{mpx / net:.1f}", r["peak_mb"], note)
        )
    print(
        f"Image {args.size} × {args.size} RGB ({mpx:.0f} Mpx), dask chunks {args.chunk}, "
        f"detection blocks {args.block}, 2 threads\n"
    )
    print("| what | seconds | Mpx/s (gross) | Mpx/s (net of rendering) | peak RSS (MB) | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for label, seconds, gross, net, peak, note in rows:
        print(f"| {label} | {seconds:.1f} | {gross:.2f} | {net} | {peak:.0f} | {note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what")
    labs = sub.add_parser("labs", help="precision, recall and red-cell scale per source")
    labs.add_argument("--fields", type=int, default=60, help="fields per source (0: all)")
    labs.add_argument("--source", action="append", help="only this source (repeatable)")
    labs.add_argument("--detector", help="detector name (default: the package's default)")
    labs.add_argument("--images", help="folder for the pictures of errors (detection-*.png)")
    labs.add_argument("--json", help="also write the figures to this JSON file")
    labs.add_argument("--data", help="data folder (default: napari_wbc.settings.data_root())")
    speed = sub.add_parser("speed", help="throughput on a large lazy synthetic smear")
    speed.add_argument("--size", type=int, default=20000)
    speed.add_argument("--chunk", type=int, default=512, help="dask chunk edge of the input")
    speed.add_argument("--block", type=int, default=2048, help="detection block edge")
    speed.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "labs":
        run_labs(args)
    elif args.what == "speed":
        run_speed(args)
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
