"""Benchmark: tiled stain normalization (the default method) of a large smear vs torchstain per tile.

    python benchmarks/bench_normalize.py [--size 20000] [--tile 2048]

Each row runs in a fresh process so its peak memory (max RSS) is its own.
The image is a synthetic smear generated lazily block by block, so the input
itself never sits in memory; "generate only" is the baseline cost of making it.
Prints a Markdown table (the one in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case_generate(size: int, tile: int) -> dict:
    import dask

    from napari_wbc.synthetic import lazy_smear

    img = lazy_smear((size, size), seed=0, chunks=tile)
    t = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=2):
        img.mean(axis=(0, 1)).compute()
    return {"seconds": time.perf_counter() - t}


def case_ours(size: int, tile: int, write: bool) -> dict:
    import dask

    from napari_wbc.progress import run
    from napari_wbc.stain import DEFAULT_METHOD, iter_prepare_normalizer, normalize_array
    from napari_wbc.synthetic import lazy_smear
    from napari_wbc.tiff import iter_write_pyramid_tiff

    img = lazy_smear((size, size), seed=0, chunks=tile)
    t = time.perf_counter()
    normalizer = run(iter_prepare_normalizer([img], DEFAULT_METHOD))
    fit_s = time.perf_counter() - t
    out = normalize_array(img, normalizer)
    with dask.config.set(scheduler="threads", num_workers=2):
        if write:
            with tempfile.TemporaryDirectory() as tmp:
                path = run(iter_write_pyramid_tiff(Path(tmp) / "out.tif", out, tile=512))
                mb = path.stat().st_size / 1e6
        else:
            out.mean(axis=(0, 1)).compute()
            mb = None
    return {"seconds": time.perf_counter() - t, "fit_seconds": fit_s, "file_mb": mb}


def case_torchstain(size: int, tile: int, n_tiles: int) -> dict:
    """torchstain's own use: normalize() on each tile, re-estimating its stains."""
    import numpy as np
    import torchstain

    from napari_wbc.synthetic import lazy_smear, make_sample_smear

    norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    norm.fit(make_sample_smear())
    img = lazy_smear((size, size), seed=0, chunks=tile)
    rng = np.random.default_rng(0)
    blocks = [tuple(b) for b in rng.permutation(list(np.ndindex(*img.numblocks[:2])))[:n_tiles]]
    failures = 0
    t = time.perf_counter()
    gen_t = 0.0
    for by, bx in blocks:
        g = time.perf_counter()
        block = np.asarray(img.blocks[by, bx].compute())
        gen_t += time.perf_counter() - g
        try:
            norm.normalize(block, stains=False)
        except Exception:
            failures += 1
    elapsed = time.perf_counter() - t - gen_t
    px = sum(img.blocks[by, bx].shape[0] * img.blocks[by, bx].shape[1] for by, bx in blocks)
    return {"seconds": elapsed, "pixels": px, "failures": failures, "tiles": len(blocks)}


def case_per_tile(size: int, tile: int, n_tiles: int = 12) -> dict:
    """The same tiles, already in memory, through each normalizer; only the transform is timed.

    Ours is fitted once on the whole image first (its fit time is reported on
    its own); the colour table it builds after a few megapixels is inside the
    timing. torchstain re-estimates its stains on every tile, as it is used.
    """
    import numpy as np
    import torchstain

    from napari_wbc.progress import run
    from napari_wbc.stain import DEFAULT_METHOD, iter_prepare_normalizer
    from napari_wbc.synthetic import lazy_smear, make_sample_smear

    img = lazy_smear((size, size), seed=0, chunks=tile)
    rng = np.random.default_rng(0)
    picked = rng.permutation(list(np.ndindex(*img.numblocks[:2])))[:n_tiles]
    tiles = [np.asarray(img.blocks[int(by), int(bx)].compute()) for by, bx in picked]
    px = sum(t.shape[0] * t.shape[1] for t in tiles)
    t = time.perf_counter()
    ours = run(iter_prepare_normalizer([img], DEFAULT_METHOD))
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    for block in tiles:
        ours(block)
    ours_s = time.perf_counter() - t
    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(make_sample_smear())
    failures = 0
    t = time.perf_counter()
    for block in tiles:
        try:
            ts.normalize(block, stains=False)
        except Exception:
            failures += 1
    ts_s = time.perf_counter() - t
    return {
        "pixels": px,
        "tiles": len(tiles),
        "ours_seconds": ours_s,
        "fit_seconds": fit_s,
        "torchstain_seconds": ts_s,
        "failures": failures,
    }


def case_seams(size: int = 4096, tile: int = 512) -> dict:
    """Max difference between tile-by-tile and whole-image results."""
    import dask.array as da
    import numpy as np
    import torchstain

    from napari_wbc.stain import DEFAULT_METHOD, normalize
    from napari_wbc.synthetic import make_sample_smear, make_smear

    img = make_smear((size, size), seed=1)
    ours_whole = normalize(img, DEFAULT_METHOD)
    ours_tiled = normalize(da.from_array(img, chunks=(tile, tile, 3)), DEFAULT_METHOD).compute()
    norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    norm.fit(make_sample_smear())
    ts_whole = norm.normalize(img, stains=False)[0].astype(int)
    diffs = []
    for y in range(0, size, tile):
        for x in range(0, size, tile):
            part = img[y : y + tile, x : x + tile]
            out = norm.normalize(part, stains=False)[0].astype(int)
            diffs.append(np.abs(out - ts_whole[y : y + tile, x : x + tile]).max())
    return {
        "ours_max_diff": int(np.abs(ours_tiled.astype(int) - ours_whole).max()),
        "torchstain_max_diff": int(max(diffs)),
        "torchstain_median_tile_diff": float(np.median(diffs)),
    }


CASES = {
    "generate": case_generate,
    "ours": lambda s, t: case_ours(s, t, write=False),
    "ours_tiff": lambda s, t: case_ours(s, t, write=True),
    "torchstain": lambda s, t: case_torchstain(s, t, n_tiles=12),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        if args.case == "seams":
            result = case_seams()
        elif args.case == "per_tile":
            result = case_per_tile(args.size, args.tile)
        else:
            result = CASES[args.case](args.size, args.tile)
        result["peak_mb"] = _peak_mb()
        print(json.dumps(result))
        return

    def child(case: str) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                case,
                "--size",
                str(args.size),
                "--tile",
                str(args.tile),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    mpx = args.size * args.size / 1e6
    rows = []
    gen = child("generate")
    rows.append(
        ("generate synthetic smear only (baseline)", mpx / gen["seconds"], gen["peak_mb"], "")
    )
    from napari_wbc.stain import DEFAULT_METHOD

    for case, label in (
        ("ours", f"napari-wbc: fit once + tiled {DEFAULT_METHOD}"),
        ("ours_tiff", "napari-wbc: … + write pyramidal TIFF"),
    ):
        r = child(case)
        # Subtract the cost of generating the input, which a file read would replace.
        net = max(r["seconds"] - gen["seconds"], 1e-9)
        note = f"fit {r['fit_seconds']:.1f} s" + (
            f", file {r['file_mb']:.0f} MB" if r.get("file_mb") else ""
        )
        rows.append((label, mpx / net, r["peak_mb"], note))
    ts = child("torchstain")
    rows.append(
        (
            "torchstain normalize() per tile (12 tiles)",
            ts["pixels"] / 1e6 / ts["seconds"],
            ts["peak_mb"],
            f"{ts['failures']}/{ts['tiles']} tiles crashed",
        )
    )
    per_tile = child("per_tile")
    seams = child("seams")
    print(
        f"Image {args.size} × {args.size} RGB ({mpx:.0f} Mpx), dask chunks {args.tile}, 2 threads\n"
    )
    print("| what | Mpx/s (net of generation) | peak RSS (MB) | notes |")
    print("|---|---:|---:|---|")
    for label, speed, peak, note in rows:
        print(f"| {label} | {speed:.1f} | {peak:.0f} | {note} |")
    print()
    mpx_tiles = per_tile["pixels"] / 1e6
    ours_rate = mpx_tiles / per_tile["ours_seconds"]
    ts_rate = mpx_tiles / per_tile["torchstain_seconds"]
    print(
        f"Per tile, the same {per_tile['tiles']} tiles of {args.tile}² in memory, one after "
        "another (transform only):\n"
    )
    print("| normalizer | Mpx/s | vs torchstain | notes |")
    print("|---|---:|---:|---|")
    print(
        f"| napari-wbc {DEFAULT_METHOD}, fitted once | {ours_rate:.1f} | {ours_rate / ts_rate:.1f}× "
        f"| fit on the whole image {per_tile['fit_seconds']:.1f} s, not included |"
    )
    print(
        f"| torchstain Macenko normalize() | {ts_rate:.1f} | 1.0× "
        f"| {per_tile['failures']}/{per_tile['tiles']} tiles crashed |"
    )
    print()
    print(
        "Seams on a 4096 × 4096 smear, 512 px tiles (max |tile-by-tile − whole image|, grey levels):"
    )
    print(f"- napari-wbc: {seams['ours_max_diff']}")
    print(
        f"- torchstain per tile: {seams['torchstain_max_diff']} "
        f"(median per tile {seams['torchstain_median_tile_diff']:.0f})"
    )


if __name__ == "__main__":
    main()
