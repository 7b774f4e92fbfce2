#!/usr/bin/env bash
# Reproduce the built-in default ensemble (MODEL_CARD.md) from the PBC data set.
#
#   bash scripts/train_default_model.sh [OUT_DIR]
#
# Trains the three `lite` members (128 px), decoupled two-stage, on a seeded
# subset of PBC (up to 1000 crops per class; a seeded, stratified 20% of it is
# the validation split), then packages them in half precision into
# src/napari_wbc/resources/models/ and lists the validation crops in
# OUT_DIR/validation.csv and the crops outside the subset in OUT_DIR/heldout.csv.
# About 47 min on a 2-core CPU. A long run can be interrupted and resumed: run
# the same command again. scripts/check_default_reproducible.py retrains one
# member with these settings and compares it with the shipped one.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${NAPARI_WBC_DATA:-../shared/data}"
OUT="${1:-outputs/default}"
SEED=0
PER_CLASS=1000
napari-wbc train "$DATA/pbc" --preset lite -o "$OUT/wbc-lite.json" \
  --per-class "$PER_CLASS" --epochs1 12 --epochs2 8 --seed "$SEED" --threads 2 -q
python scripts/package_default_model.py "$OUT/wbc-lite.json" --data "$DATA" \
  --per-class "$PER_CLASS" --seed "$SEED" \
  --validation "$OUT/validation.csv" --heldout "$OUT/heldout.csv"
