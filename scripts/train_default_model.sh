#!/usr/bin/env bash
# Reproduce the built-in default ensemble (MODEL_CARD.md) from the shared data.
#
#   bash scripts/train_default_model.sh [OUT_DIR]
#
# Trains three resnet10t members (seeds 0, 1, 2; 96 px; 80 stage-1 epochs) on
# PBC's training split, LISC and BCCD with domain randomization and the
# paper's two stages (scripts/train_crosslab.py --holdout none --classes pbc),
# two at a time on one thread each, then packages them in half precision into
# src/napari_wbc/resources/models/, fits the trust statistics and measures
# the model card's figures. About 75 min on a 2-core CPU. An interrupted run
# resumes from its checkpoints: run the same command again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/builtin}"
member() {
  local dir="$OUT/dr-all-8c-s$1"
  [[ -f $dir/model.safetensors ]] && return 0
  mkdir -p "$dir"
  python scripts/train_crosslab.py --aug dr --holdout none --classes pbc --seed "$1" \
    --epochs1 80 --input 96 --threads 1 -o "$dir" > "$dir/train.log" 2>&1
}
member 0 & member 1 & wait
member 2
python scripts/package_default_model.py "$OUT"/dr-all-8c-s{0,1,2}/model.safetensors
python scripts/fit_trust.py --split crosslab
python scripts/evaluate_default_model.py -o "$OUT/evaluation.json"
