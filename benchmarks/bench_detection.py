"""Benchmark: tiled white-cell detection on a large lazy synthetic smear.

    python benchmarks/bench_detection.py [--size 20000] [--chunk 512] [--block 2048]

Each row runs in a fresh process so its peak memory (max RSS) is its own. The
image is a synthetic smear rendered lazily chunk by chunk, so the input never
sits in memory whole; "generate only" is the cost of rendering it once, which
reading a file would replace. Detection reads every block with a halo, so it
renders some pixels more than once: the table says how many pixels it read.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--chunk", type=int, default=512, help="dask chunk edge of the input")
    parser.add_argument("--block", type=int, default=2048, help="detection block edge")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        result = CASES[args.case](args.size, args.chunk, args.block)
        result["peak_mb"] = _peak_mb()
        print(json.dumps(result))
        return

    def child(case: str) -> dict:
        cmd = [sys.executable, __file__, "--case", case, "--size", str(args.size)]
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
        note = f"{r['cells']} cells found, {r['true_cells']} in truth; read {r['read_pixels'] / 1e6 / mpx:.2f}× the image"
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


if __name__ == "__main__":
    main()
