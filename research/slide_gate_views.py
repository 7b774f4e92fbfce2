"""Every view of every member on a whole slide's cells, for research/gate_policies.py (issue #15).

    python -m research.slide_gate_views /tmp/napari-wbc-real-slide-20000.tif \\
        /tmp/napari-wbc-real-slide-20000.csv -o outputs/gate/views/slide.npz

The slide (benchmarks/real_cell_slide.py) is classified once as the product
does it (detection, scale, stain fit, model choice), and the crops each
block hands to the networks are kept, as each member's input. Then every
member's logits and pre-logit features are computed for each of the eight
D4 views, in the layout of research/gate_study.py; each cell's class is the
pasted cell's within 4 µm (40 px), or -1. Any gating policy can then be
replayed on the slide's cells as on the crop sets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

import napari_wbc.pipeline as pipeline
from napari_wbc.images import read_smear
from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
from napari_wbc.progress import run
from napari_wbc.routing import load_model
from napari_wbc.threads import configure_threads
from research.gate_study import every_view


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("slide", type=Path)
    p.add_argument("truth", type=Path, help="the slide's pasted cells (real_cell_slide.py's .csv)")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    configure_threads(args.threads)
    router = load_model("auto")
    ens = router.specialist
    tables, inputs = [], []
    real = pipeline.iter_classify_cells

    def keep(found, ensemble, config, timer=None, known=None):
        for own, crops in found:
            tables.append(own[["y", "x"]].copy())
            inputs.append(np.asarray(crops))
        return (yield from real(found, ensemble, config, timer, known))

    pipeline.iter_classify_cells = keep
    smear = read_smear(args.slide)
    try:
        cells = run(iter_classify_smear(smear, router, ClassifyConfig(device="cpu", tta="none")))
    finally:
        smear.close()
        pipeline.iter_classify_cells = real
    if cells.attrs.get("model") != "wbc-pbc":
        raise SystemExit(f"the slide went to {cells.attrs.get('model')}, not the specialist")
    x = np.concatenate(inputs)
    own = pd.concat(tables, ignore_index=True)
    truth = pd.read_csv(args.truth)
    d, i = cKDTree(truth[["y", "x"]].to_numpy()).query(own[["y", "x"]].to_numpy())
    names = truth["label"].to_numpy()[i]
    labels = np.asarray(
        [
            ens.classes.index(c) if near and c in ens.classes else -1
            for c, near in zip(names, d <= 40, strict=True)
        ]
    )
    print(f"{len(x)} cells, {(labels >= 0).sum()} matched to a pasted cell", flush=True)
    logits, features = every_view(ens, x)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output,
        logits=logits,  # (M, V, N, C)
        labels=labels,
        model=np.asarray("wbc-pbc"),
        **{f"features{j}": f for j, f in enumerate(features)},  # (V, N, D_j)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
