#!/usr/bin/env bash
# Train the fold models of the leave-one-lab-out benchmark, two at a time
# (one torch thread each), skipping those already trained.
#
#   nohup bash scripts/run_crosslab_lolo.sh > outputs/crosslab/queue.log 2>&1 &
#
# Each run resumes from its checkpoint when interrupted. RUNS, EPOCHS1, INPUT
# and PARALLEL override the runs ("aug:holdout" pairs), the stage-1 epochs,
# the network's input size and how many run at once (1 or 2).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/crosslab}
EPOCHS1=${EPOCHS1:-8}
INPUT=${INPUT:-64}
PARALLEL=${PARALLEL:-2}
RUNS=${RUNS:-"dr:lisc dr:bccd mild:lisc mild:bccd dr:pbc mild:pbc"}
train() {
  local aug=${1%%:*} lab=${1##*:}
  local dir=$OUT/$aug-$lab
  [[ -f $dir/model.safetensors ]] && return 0
  mkdir -p "$dir"
  python scripts/train_crosslab.py --aug "$aug" --holdout "$lab" --epochs1 "$EPOCHS1" --input "$INPUT" \
    --threads 1 -o "$dir" > "$dir/train.log" 2>&1
}
set -- $RUNS
while (($#)); do
  train "$1" &
  if ((PARALLEL > 1 && $# > 1)); then
    train "$2" &
    wait
    shift 2
  else
    wait
    shift
  fi
done
