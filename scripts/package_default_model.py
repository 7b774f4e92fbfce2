"""Package a trained ensemble as the built-in default (half precision, inside the package).

    python scripts/package_default_model.py OUT/wbc-lite.json [--heldout OUT/heldout.csv]
        [--validation OUT/validation.csv]

Re-saves every member with float16 weights into
src/napari_wbc/resources/models/, writes the ensemble file wbc-lite.json there,
lists the seeded, stratified validation split the members were trained beside
(never trained on) in --validation, and the PBC crops outside the training
subset altogether in --heldout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_wbc.datasets import balanced_subset, load_labelled_crops
from napari_wbc.models.files import load_model, read_ensemble, save_ensemble, save_model
from napari_wbc.settings import data_root
from napari_wbc.training import TrainConfig, validation_split

TARGET = Path(__file__).resolve().parents[1] / "src/napari_wbc/resources/models"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ensemble", type=Path)
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=Path)
    parser.add_argument("--validation", type=Path)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args()

    config = read_ensemble(args.ensemble)
    TARGET.mkdir(parents=True, exist_ok=True)
    paths = []
    for ref in config.members:
        source = Path(ref.path)  # read_ensemble resolves it against the ensemble's folder
        model, model_config = load_model(source, cache=False)
        paths.append(save_model(TARGET / source.name, model, model_config, half=True))
        print(f"{source.name}: {paths[-1].stat().st_size / 1e6:.1f} MB")
    save_ensemble(
        TARGET / "wbc-lite.json",
        paths,
        tta="d4",
        name="wbc-lite",
        metrics=config.metrics,
        notes="napari-wbc default: lite ensemble trained on PBC (Acevedo et al. 2020, "
        "CC BY 4.0); see MODEL_CARD.md",
    )
    total = sum(p.stat().st_size for p in paths) / 1e6
    print(f"wrote {TARGET / 'wbc-lite.json'} ({total:.1f} MB of weights)")
    table = load_labelled_crops(args.data / "pbc" / "labels.csv")
    used = balanced_subset(table, per_class=args.per_class, seed=args.seed)
    if args.validation:
        # The same rows `napari-wbc train` kept out of training for this seed.
        split = TrainConfig(seed=args.seed, val_fraction=args.val_fraction)
        _, val = validation_split(used, split)
        val[["path", "label"]].to_csv(args.validation, index=False)
        print(f"{len(val)} validation crops listed in {args.validation}")
    if args.heldout:
        heldout = table.drop(index=used.index)[["path", "label"]]
        heldout.to_csv(args.heldout, index=False)
        print(f"{len(heldout)} held-out crops listed in {args.heldout}")


if __name__ == "__main__":
    main()
