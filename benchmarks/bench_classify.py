"""Benchmark: classifying white cells, end to end on a large smear and per crop.

    python benchmarks/bench_classify.py [--size 20000] [--preset lite] [--crops 256]

Models are random-initialised members of the preset (speed does not depend on
the weights), or the built-in ensemble with ``--preset default``. Each row runs in a fresh process; peak RSS is that process's
maximum resident memory. Prints Markdown tables (docs/benchmarks.md).
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


def _make_models(preset: str, folder: Path) -> list[Path]:
    """Random-initialised members of a preset, or the built-in ensemble's files for "default"."""
    import torch

    if preset == "default":
        from napari_wbc.models.files import default_model_path, read_ensemble, save_ensemble

        ensemble = default_model_path()
        paths = [ensemble.parent / ref.path for ref in read_ensemble(ensemble).members]
        save_ensemble(folder / "ensemble.json", paths, tta="d4")
        return paths

    from napari_wbc.models.build import build_model
    from napari_wbc.models.files import ModelConfig, save_ensemble, save_model
    from napari_wbc.models.registry import get_preset
    from napari_wbc.stain import default_reference

    torch.manual_seed(0)
    paths = []
    for spec in get_preset(preset):
        model, _ = build_model(spec, pretrained=False)
        config = ModelConfig(
            spec=spec, stain=default_reference().to_dict(), training={"stain_method": "macenko"}
        )
        paths.append(save_model(folder / f"{spec.name}.safetensors", model, config))
    save_ensemble(folder / "ensemble.json", paths, tta="d4")
    return paths


def case_end_to_end(size: int, preset: str, tta: str) -> dict:
    import torch

    from napari_wbc.inference import load_any
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.synthetic import lazy_smear

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        _make_models(preset, Path(tmp))
        ensemble = load_any(Path(tmp) / "ensemble.json")
        image = lazy_smear((size, size), seed=0, chunks=2048)
        t = time.perf_counter()
        cells = run(
            iter_classify_smear(
                image, ensemble, ClassifyConfig(pixel_size_um=0.1, tta=tta, device="cpu")
            )
        )
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "cells": len(cells)}


def case_crops(preset: str, n: int, member: str | None, tta: str) -> dict:
    import numpy as np
    import torch

    from napari_wbc.inference import load_any, predict_crops

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (n, 360, 360, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        paths = _make_models(preset, Path(tmp))
        target = (
            Path(tmp) / "ensemble.json"
            if member is None
            else next(p for p in paths if p.stem == member)
        )
        ensemble = load_any(target, tta=tta)
        predict_crops(ensemble, crops[:8], tta=tta, device="cpu")  # warm-up
        t = time.perf_counter()
        predict_crops(ensemble, crops, batch_size=32, tta=tta, device="cpu")
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "cells": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--preset", default="lite")
    parser.add_argument("--crops", type=int, default=256)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--member", help=argparse.SUPPRESS)
    parser.add_argument("--tta", default="d4", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        if args.case == "end_to_end":
            result = case_end_to_end(args.size, args.preset, args.tta)
        else:
            result = case_crops(args.preset, args.crops, args.member, args.tta)
        result["peak_mb"] = _peak_mb()
        print(json.dumps(result))
        return

    def child(*extra: str) -> dict:
        cmd = [sys.executable, __file__, "--size", str(args.size), "--preset", args.preset,
               "--crops", str(args.crops), *extra]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    if args.preset == "default":
        from napari_wbc.models.files import default_model_path, read_ensemble

        members = [Path(ref.path).stem for ref in read_ensemble(default_model_path()).members]
    else:
        from napari_wbc.models.registry import get_preset

        members = [s.name for s in get_preset(args.preset)]
    print(
        f"Classification speed, {args.crops} crops of 360 px, preset {args.preset!r}, CPU, 2 threads\n"
    )
    print("| model | TTA | cells/s | peak RSS (MB) |\n|---|---|---:|---:|")
    for member in [*members, None]:
        for tta in ("none", "d4"):
            extra = ["--case", "crops", "--tta", tta] + (["--member", member] if member else [])
            r = child(*extra)
            print(
                f"| {member or 'ensemble'} | {tta} | {r['cells'] / r['seconds']:.1f} | {r['peak_mb']:.0f} |",
                flush=True,
            )
    r = child("--case", "end_to_end", "--tta", "d4")
    mpx = args.size * args.size / 1e6
    print(f"\nEnd to end on a {args.size} × {args.size} synthetic smear ({mpx:.0f} Mpx, generated lazily), "
          f"ensemble with D4 TTA:\n")  # fmt: skip
    print("| cells | seconds | Mpx/s | cells/s | peak RSS (MB) |\n|---:|---:|---:|---:|---:|")
    print(
        f"| {r['cells']} | {r['seconds']:.0f} | {mpx / r['seconds']:.2f} | {r['cells'] / r['seconds']:.1f} | {r['peak_mb']:.0f} |"
    )


if __name__ == "__main__":
    main()
