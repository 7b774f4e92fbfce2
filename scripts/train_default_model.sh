#!/usr/bin/env bash
# Reproduce the built-in default ensemble (MODEL_CARD.md) from the PBC data set.
#
#   bash scripts/train_default_model.sh [OUT_DIR]
#
# Trains the three `lite` members, decoupled two-stage, on a seeded balanced
# subset of PBC (600 crops per class; 20% of it is the validation split), then
# packages them in half precision into src/napari_wbc/resources/models/ and
# writes the held-out PBC crops (all the others) to OUT_DIR/heldout.csv.
# A long run can be interrupted and resumed: run the same command again.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${NAPARI_WBC_DATA:-../shared/data}"
OUT="${1:-outputs/default}"
SEED=0
PER_CLASS=600
napari-wbc train "$DATA/pbc" --preset lite -o "$OUT/wbc-lite.json" \
  --per-class "$PER_CLASS" --input-size 64 --epochs1 10 --epochs2 8 --seed "$SEED" --threads 2 -q
python scripts/package_default_model.py "$OUT/wbc-lite.json" --data "$DATA" \
  --per-class "$PER_CLASS" --seed "$SEED" --heldout "$OUT/heldout.csv"
