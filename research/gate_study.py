"""Per-view, per-member outputs of the built-in models on whole labelled sets (issue #15).

    python -m research.gate_study -o outputs/gate/views

For PBC's validation split (never trained on), all of LISC and BCCD's typed
cells (cut at twice the field of view, as benchmarks/bench_gate.py does),
the crops are read by the product's path (scale measured, routed by
``auto``, adapted where the product adapts by default) and every member's
logits and pre-logit features are saved for each of the eight D4 views,
one ``.npz`` per set. Any gating policy can then
be replayed exactly (research/gate_policies.py) without running a network.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from benchmarks.bench_gate import lab_sets

from napari_wbc.adapt import adapt_ensemble_and_passes, adapt_method, auto_adapts
from napari_wbc.bnfold import inference_model
from napari_wbc.passes import empty_sums, iter_add_views
from napari_wbc.prediction import iter_route_sample
from napari_wbc.progress import run
from napari_wbc.routing import ROUTE_CELLS, load_model
from napari_wbc.session import ClassifySession
from napari_wbc.threads import configure_threads
from napari_wbc.tta import TTA_SETS


def sets(folder: Path) -> dict[str, pd.DataFrame]:
    """Every crop of the three sets benchmarks/bench_gate.py times (BCCD's cut into ``folder``)."""
    named = lab_sets(0, folder)
    return {"pbc": named["PBC validation"], "lisc": named["LISC"], "bccd": named["BCCD"]}


def every_view(ens, crops) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every member's logits (M, V, N, C) and pre-logit features ([(V, N, D_j)]) for the D4 views.

    ``crops``: (N, H, W, 3) uint8 as the ensemble classifies them; each view
    is run through the product's own pass (:func:`napari_wbc.passes.iter_add_views`).
    """
    prepared = []
    for member in ens.members:
        spec = member.config.spec
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        prepared.append((inference_model(member.model), spec.input_size, mean, std))
    logits, features = [], [[] for _ in ens.members]
    for view in TTA_SETS["d4"]:
        s = empty_sums(ens, len(crops))
        run(
            iter_add_views(
                ens,
                prepared,
                crops,
                [view],
                range(len(prepared)),
                0,
                s,
                np.arange(len(crops)),
                64,
                torch.device("cpu"),
                "classify",
            )
        )
        logits.append(s["logits"])
        for j, f in enumerate(s["features"]):
            features[j].append(f)
    return np.stack(logits, 1), [np.stack(f) for f in features]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument(
        "--no-adapt", action="store_true", help="never adapt (the product adapts sets by default)"
    )
    args = p.parse_args(argv)
    configure_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    router = load_model("auto")
    tmp = tempfile.TemporaryDirectory()
    for name, table in sets(Path(tmp.name)).items():
        if args.only and name not in args.only:
            continue
        paths = table["path"].astype(str).tolist()
        t = time.perf_counter()
        found = router.specialist.preprocessor.resolve_crop_scale(paths, "auto")
        session = ClassifySession(router, device="cpu", batch_size=64)
        pick = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), ROUTE_CELLS)).astype(int))
        sample = functools.partial(
            iter_route_sample, paths=paths, pick=pick, stain_source="auto", found=found
        )
        ens = run(session.iter_choose(sample))
        route = session.route
        crops = run(ens.preprocessor.iter_read_crop_files(paths, "auto", found.rbc_diameter_px))
        if not args.no_adapt and auto_adapts(route, len(paths)):
            # As the product does by default for a set the three-lab model is given.
            ens, _ = adapt_ensemble_and_passes(ens, crops, method=adapt_method(True))
        logits, features = every_view(ens, crops)
        np.savez_compressed(
            args.output / f"{name}.npz",
            logits=logits,  # (M, V, N, C)
            labels=np.asarray(
                [ens.classes.index(c) if c in ens.classes else -1 for c in table["label"]]
            ),
            model=np.asarray(route.model),
            **{f"features{j}": f for j, f in enumerate(features)},  # (V, N, D_j)
        )
        print(name, len(paths), ens.name, f"{time.perf_counter() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
