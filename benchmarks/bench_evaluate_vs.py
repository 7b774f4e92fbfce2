"""`napari-wbc evaluate` on the issue's 400 PBC crops: this checkout against another (issue #15).

    python benchmarks/bench_evaluate_vs.py /tmp/main-before/src [--runs 3]

The crops are the 50 PBC validation crops per class that
``bench_gate.py``'s command-line rows use. Each run is a fresh process
(import included, as a user meets it), the two checkouts alternating so
that both see the same machine; the table gives each run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_gate import lab_sets

from napari_wbc.datasets import balanced_subset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other_src", type=Path, help="the other checkout's src folder")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    here = Path(__file__).parents[1] / "src"
    with tempfile.TemporaryDirectory() as tmp:
        sets = lab_sets(0, Path(tmp))
        pbc = balanced_subset(sets["PBC validation"], per_class=50, seed=7)[["path", "label"]]
        csv = Path(tmp) / "pbc.csv"
        pbc.to_csv(csv, index=False)
        seconds: dict[str, list[float]] = {"other": [], "this": []}
        f1 = {}
        for _ in range(args.runs):
            for name, src in (("other", args.other_src), ("this", here)):
                env = dict(os.environ, PYTHONPATH=str(src.resolve()))
                cmd = [sys.executable, "-m", "napari_wbc.cli", "evaluate", str(csv), "-q"]
                cmd += ["--threads", str(args.threads), "--json"]
                t = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                seconds[name].append(time.perf_counter() - t)
                f1[name] = json.loads(out.stdout)["macro_f1"]
                print(f"{name}: {seconds[name][-1]:.1f} s, macro-F1 {f1[name]:.4f}", flush=True)
    print(f"\n| run | {' | '.join(str(i + 1) for i in range(args.runs))} | median | macro-F1 |")
    print("|---|" + "---:|" * (args.runs + 2))
    for name, label in (("other", str(args.other_src)), ("this", "this checkout")):
        runs = " | ".join(f"{s:.1f} s" for s in seconds[name])
        med = statistics.median(seconds[name])
        print(
            f"| {label} | {runs} | {med:.1f} s ({len(pbc) / med:.1f} cells/s) | {f1[name]:.4f} |"
        )
    ratio = statistics.median(seconds["other"]) / statistics.median(seconds["this"])
    print(f"\nThis checkout: {ratio:.2f}x the other's cells/s (medians).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
