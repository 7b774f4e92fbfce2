"""Leave one lab out: the held-out cells' colours mapped onto the training labs' (#12).

    python -m research.crosslab_stain_target outputs/lolo8c outputs/lolo8c-s1 [--json out.json]

The three-lab recipe trains on raw colours with stain randomization, so a
new lab's cells reach the network in their own colours. Here they are also
mapped onto the colours of the labs the fold models trained on (a stain
normalizer: source fitted on the held-out cells, target fitted on a seeded
sample of the training labs' cells), with each registered method; the
normalized cells, and the mean of their answers and the raw cells', are
scored. Everything else is the product's crop path: the two seeds' fold
models as one ensemble, scale measured times the other lab's field-of-view
factor, prototype adaptation (on the cells as classified), doubt-gated D4.
The held-out lab chooses nothing: a variant counts only if it is chosen on
the other lab.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from benchmarks.bench_crosslab import Rows, fold_ensemble, metric_row
from benchmarks.bench_gate import lab_sets

from napari_wbc.adapt import adapt_ensemble_and_passes
from napari_wbc.datasets import load_lab_table, read_lab_crops, stratified_split
from napari_wbc.inference import iter_predict_crops
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.registry import PBC_CLASSES
from napari_wbc.progress import run
from napari_wbc.stain import StainNormalizer, fit_stain_reference
from napari_wbc.threads import configure_threads, thread_map
from research.crosslab_zoom_adapt import OTHER_LABS_K

TRAINING_LABS = {"bccd": ("pbc", "lisc"), "lisc": ("pbc", "bccd")}
#: Crops per training lab pooled for the target.
TARGET_CROPS = 64


def training_target(lab: str, only: str | None = None):
    """Stain statistics of a seeded sample of the fold's training labs' cells (or lab ``only``)."""
    pixels = []
    for other in (only,) if only else TRAINING_LABS[lab]:
        table = load_lab_table(other, classes=PBC_CLASSES) if other == "pbc" else None
        table = load_lab_table(other) if table is None else table
        if other == "pbc":  # its training split only
            train, _ = stratified_split(table["label"].tolist(), 0.2, seed=0)
            table = table.iloc[train]
        pick = np.random.default_rng(0).choice(len(table), TARGET_CROPS, replace=False)
        crops = read_lab_crops(table.iloc[np.sort(pick)], size=128)
        pixels.append(crops.reshape(-1, 3))
    return fit_stain_reference(np.concatenate(pixels), description=f"{lab} fold's training labs")


def classify(ensemble, crops) -> np.ndarray:
    adapted, known = adapt_ensemble_and_passes(ensemble, crops, method="prototypes")
    result = run(iter_predict_crops(adapted, crops, tta="d4", gate=True, known=known))
    return result["probs"], list(result["classes"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--pictures", type=Path, default=None, help="folder for before/after grids")
    p.add_argument(
        "--target-lab", default=None, help="one training lab's colours as the target (e.g. pbc)"
    )
    args = p.parse_args(argv)
    configure_threads(2)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    names = {"lisc": "LISC", "bccd": "BCCD"}
    rows = Rows(args.json)
    for lab in ("bccd", "lisc"):
        ensemble = fold_ensemble(args.roots, lab)
        table = sets[names[lab]][["path", "label"]]
        paths = table["path"].astype(str).tolist()
        labels = table["label"].astype(str).tolist()
        pre = ensemble.preprocessor
        found = pre.resolve_crop_scale(paths, "measure")
        read = pre.crop_file_reader(found.rbc_diameter_px * OTHER_LABS_K[lab])
        raw = np.stack(thread_map(read, paths))
        pick = np.random.default_rng(0).permutation(len(raw))[:64]
        source = fit_stain_reference(raw[pick].reshape(-1, 3), description=f"held-out {lab}")
        target = training_target(lab, args.target_lab)
        shown = [raw[pick[:8]]]
        probs_raw, classes = classify(ensemble, raw)
        m = classification_metrics(labels, probs_raw.argmax(1), classes)
        rows.add(metric_row(m, fold=lab, colours="raw (as shipped)"))
        for method in ("regions", "macenko", "reinhard"):
            if method not in source.stats or method not in target.stats:
                print(f"{lab}: {method} refused", flush=True)
                continue
            normalized = StainNormalizer(method, source, target)(raw)
            shown.append(normalized[pick[:8]])
            probs, _ = classify(ensemble, normalized)
            m = classification_metrics(labels, probs.argmax(1), classes)
            rows.add(metric_row(m, fold=lab, colours=f"{method} onto the training labs"))
            m = classification_metrics(labels, (probs + probs_raw).argmax(1), classes)
            rows.add(metric_row(m, fold=lab, colours=f"mean of raw and {method}"))
        if args.pictures:
            from PIL import Image

            args.pictures.mkdir(parents=True, exist_ok=True)
            grid = np.concatenate([np.concatenate(list(r), axis=1) for r in shown], axis=0)
            # Rows: raw, then each method's normalization (regions, macenko, reinhard).
            name = f"stain-target-{lab}{'-' + args.target_lab if args.target_lab else ''}.png"
            Image.fromarray(grid).save(args.pictures / name)
    rows.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
