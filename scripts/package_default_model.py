"""Package trained members as the built-in ensemble (half precision, inside the package).

    python scripts/package_default_model.py outputs/builtin/wbc-lite.safetensors

Re-saves every member with float16 weights into
src/napari_wbc/resources/models/ as ``wbc-lite-<i>.safetensors``, removes the
members of the previous built-in ensemble, and writes the ensemble file
wbc-lite.json there (test-time augmentation ``--tta``, d4 by default: chosen
on PBC's validation split, see docs/results.md). Refit its trust statistics
afterwards (scripts/fit_trust.py) and rerun scripts/evaluate_default_model.py.

The members are made by ``napari-wbc train --labs all --classes pbc``
(scripts/train_default_model.sh): trained on PBC (its training split),
LISC, BCCD and Raabin.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_wbc.models.files import load_network, save_ensemble, save_model

TARGET = Path(__file__).resolve().parents[1] / "src/napari_wbc/resources/models"
NOTES = (
    "napari-wbc default: EfficientNet-Lite0 from ImageNet weights, trained on four labs (PBC, "
    "Acevedo et al. 2020, CC BY 4.0; LISC; BCCD, MIT; Raabin-WBC) with domain randomization "
    "and the paper's two stages (napari-wbc train --labs all --classes pbc --fov-rbc 3.2); "
    "see MODEL_CARD.md"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", type=Path, nargs="+", help="trained member model files")
    parser.add_argument("--tta", default="d4")
    args = parser.parse_args()

    TARGET.mkdir(parents=True, exist_ok=True)
    old = sorted(TARGET.glob("wbc-lite-*.safetensors"))
    paths, metrics = [], {}
    for i, source in enumerate(args.members):
        model, config = load_network(source, cache=False)
        config.name = f"wbc-lite-{i}"
        path = TARGET / f"wbc-lite-{i}.safetensors"
        paths.append(save_model(path, model, config, half=True))
        metrics[config.name] = config.metrics
        print(f"{source} -> {path.name}: {path.stat().st_size / 1e6:.1f} MB")
    for file in old:
        if file not in paths:
            file.unlink()
    save_ensemble(
        TARGET / "wbc-lite.json",
        paths,
        tta=args.tta,
        name="wbc-lite",
        metrics={"members": metrics},
        notes=NOTES,
    )
    total = sum(p.stat().st_size for p in paths) / 1e6
    print(f"wrote {TARGET / 'wbc-lite.json'} ({total:.1f} MB of weights)")


if __name__ == "__main__":
    main()
