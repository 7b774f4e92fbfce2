#!/usr/bin/env bash
# Train the three fold models of the leave-one-lab-out benchmark with the
# product's trainer (napari-wbc train --labs), all at once on one torch thread
# each, skipping those already trained, then score them.
#
#   nohup bash scripts/run_crosslab_lolo.sh > outputs/crosslab2/queue.log 2>&1 &
#   OUT=outputs/crosslab2-lite1 ARCH=tf_efficientnet_lite1 nohup bash scripts/run_crosslab_lolo.sh ...
#   OUT=outputs/crosslab3-e36 EPOCHS1=36 nohup bash scripts/run_crosslab_lolo.sh ...
#   OUT=outputs/crosslab2-s1 SEED=1 SCORE=0 nohup bash scripts/run_crosslab_lolo.sh ...
#   OUT=outputs/crosslab6-128 INPUT=128 FOLDS="lisc bccd" SCORE=0 nohup bash scripts/run_crosslab_lolo.sh ...
#
# Each fold leaves one lab out (never read). Its field of view was chosen
# without the held-out lab (research/fov_probe.py, docs/results.md); every
# other setting is napari_wbc.crosslab.LabsTrainConfig's default. An
# interrupted run resumes from its checkpoint: run the script again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/crosslab2}
SEED=${SEED:-0}
ARCH=${ARCH:-tf_efficientnet_lite0}
EPOCHS1=${EPOCHS1:-}  # stage-1 epochs; empty: the recipe's default
INPUT=${INPUT:-}  # network input side in px; empty: the recipe's default
FOLDS=${FOLDS:-raabin lisc bccd}  # the held-out labs to train folds for
TRAIN=${TRAIN:-napari-wbc}  # the trainer's command (a research wrapper of it, e.g. "python -m research.mixstyle_train")
SCORE=${SCORE:-1}  # 0: train only (score with research/lolo_ensemble.py)
fold() {  # fold HELD_OUT FOV
  local dir=$OUT/in-$1
  [[ -f $dir/model.safetensors ]] && return 0
  mkdir -p "$dir"
  $TRAIN train --labs all --holdout "$1" --classes shared --fov-rbc "$2" --seed "$SEED" \
    --arch "$ARCH" ${EPOCHS1:+--epochs1 "$EPOCHS1"} ${INPUT:+--input-size "$INPUT"} --threads 1 -q -o "$dir/model.safetensors" > "$dir/train.log" 2>&1
}
declare -A FOV=([raabin]=3.2 [lisc]=4.8 [bccd]=3.2)
for lab in $FOLDS; do fold "$lab" "${FOV[$lab]}" & done
wait
[[ $SCORE == 0 ]] && exit 0
python benchmarks/bench_crosslab.py "$OUT" --json "$OUT/lolo.json"
