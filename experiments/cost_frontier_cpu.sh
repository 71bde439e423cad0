#!/usr/bin/env bash
# Iso-cost frontier on a 2-core CPU (issue 25): is an NSL kind worth its cost against a wider plain CNN-9?
# Same protocol as cifar10_full_cpu.sh and predictor_study_cpu.sh (all 50,000 training images, CNN-9, protocol
# `fast`, 5 epochs of batch 128, all 10,000 test images, seeds paired: a seed fixes the data order and the
# augmentation), one run per variant and seed in OUT/VARIANT-sSEED:
#   * the conv width curve: conv at widths 12, 24 and 32 (seeds 0-2) beside conv at width 16 (seeds 0-9);
#   * enough seeds to decide at width 16 (seeds 0-9, paired with conv): static-full, static-diagonal and
#     sphere64-stage-half (dynamic-diagonal, one half-resolution prediction per stage);
#   * at the authors' width: static-full at width 32 (seeds 0-2), paired with conv at width 32;
#   * a longer schedule: conv and static-full at width 16 for 20 epochs (seeds 0-2);
#   * not in the default list (select them with RUNS): the light kind with its predictor's batch norms and without
#     norms (issue 26: a predictor without batch statistics runs its backward in one pass; does it keep the accuracy?)
# JOBS runs (default 2) go side by side, one thread each, the cheapest first; finished runs (OUT/NAME-sSEED/done)
# are skipped and interrupted ones resumed: re-run the same command to continue. RUNS="NAME:SEED ..." selects a
# part; TRAIN_ARGS replaces the run length (default: --epochs 5 --batch-size 128 --set checkpoint_every=100; the
# variants' --set options come after it). Then: python experiments/cost_frontier_table.py OUT (the table, the JSON
# record and the figure; see the README's "When to use NSL" for the full command).
# Usage: bash experiments/cost_frontier_cpu.sh DATA_DIR [OUT_DIR]     (DATA_DIR holds cifar-10-batches-py/)
set -euo pipefail
DATA=${1:?usage: cost_frontier_cpu.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/cost-frontier-cpu}
JOBS=${JOBS:-2}
TRAIN_ARGS=${TRAIN_ARGS:---epochs 5 --batch-size 128 --set checkpoint_every=100}
# NAME KIND [KEY=VALUE ...]: the KEY=VALUEs go to nsl train as --set (after width=16 and the 5 epochs)
VARIANTS="conv conv
conv-w12 conv width=12
conv-w24 conv width=24
conv-w32 conv width=32
static-full static-full
static-diagonal static-diagonal
sphere64-stage-half dynamic-diagonal share_prediction=true predictor_stride=2
static-full-w32 static-full width=32
conv-e20 conv epochs=20
static-full-e20 static-full epochs=20
light dynamic-diagonal-light
light-none dynamic-diagonal-light predictor_norm=none"
# NAME:SEED in the order they start (about the cheapest first: a run at width 16 is 7-11 min of one core, width
# 12 about 0.6x, width 24 2-2.5x, width 32 about 4x, sphere64-stage-half 1.75x, 20 epochs 4x). Seeds 0-2 of the
# width-16 candidates come first: runs pair only with runs of the same machine (a CPU with other vector units
# rounds differently, and a run's trajectory with it), so the recorded runs of an earlier machine are redone here.
s3_9="3 4 5 6 7 8 9"
DEFAULT_RUNS="$(for s in 0 1 2; do echo conv:$s conv-w12:$s static-full:$s sphere64-stage-half:$s; done)
$(for s in $s3_9; do echo conv:$s; done) $(for s in 0 1 2 $s3_9; do echo static-diagonal:$s; done)
$(for s in $s3_9; do echo static-full:$s; done) $(for s in $s3_9; do echo sphere64-stage-half:$s; done)
$(for s in 0 1 2; do echo conv-w24:$s; done) $(for s in 0 1 2; do echo conv-w32:$s static-full-w32:$s; done)
$(for s in 0 1 2; do echo conv-e20:$s static-full-e20:$s; done)"
RUNS=${RUNS:-$DEFAULT_RUNS}

# one NAME:SEED: skipped when OUT/NAME-sSEED/done exists, resumed from its last checkpoint
one() {
  local name=${1%%:*} seed=${1##*:} line words kind dir opt
  line=$(grep -E "^$name( |$)" <<< "$VARIANTS") || { echo "cost_frontier_cpu.sh: unknown variant $name" >&2; return 1; }
  read -r -a words <<< "$line"
  kind=${words[1]}
  dir="$OUT/$name-s$seed"
  [ -f "$dir/done" ] && return 0
  local -a length args=(--set width=16) resume=()
  read -r -a length <<< "$TRAIN_ARGS"
  for opt in "${words[@]:2}"; do args+=(--set "$opt"); done
  [ -f "$dir/checkpoints/last.pt" ] && resume=(--resume)
  echo "$(date +%H:%M:%S) start $name seed $seed" >&2
  nsl train --dataset cifar10 --data-dir "$DATA" --model cnn9 --layer "$kind" --protocol fast --seed "$seed" \
    --out "$dir" --no-progress "${length[@]}" "${args[@]}" "${resume[@]}" \
    > "$OUT/$name-s$seed.log" 2>&1 || { echo "$(date +%H:%M:%S) FAILED $name seed $seed: $OUT/$name-s$seed.log" >&2; return 1; }
  touch "$dir/done"
  echo "$(date +%H:%M:%S) done $name seed $seed" >&2
}

if [ "${_NSL_FRONTIER_ONE:-}" ]; then one "$3"; exit; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
# shellcheck disable=SC2086
printf '%s\n' $RUNS | _NSL_FRONTIER_ONE=1 xargs -P "$JOBS" -I{} bash "$0" "$DATA" "$OUT" {}
