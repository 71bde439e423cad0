#!/usr/bin/env bash
# Few-shot CPU-budget comparison (issue 4): Conv-4 ProtoNet, baseline conv vs NSL layer kinds.
# Usage: bash experiments/fewshot_cpu.sh DATA_DIR [OUT_DIR]   (DATA_DIR: materialize.py output)
# One model per (dataset, kind), trained on 5-way 5-shot 15-query episodes (2000; FC100: 1000; Omniglot:
# 1500 20-way 1-shot 5-query, rotations as classes; lr halved every 500 episodes, Omniglot 400), evaluated on 600
# fixed test episodes per setting, each NSL model paired with the conv baseline on the same episodes
# (nsl fewshot eval --compare).
# Runs one process at a time with one thread (OMP_NUM_THREADS=1); finished runs and evaluations are
# skipped, so the script can be re-run after an interruption. DATASETS="..." selects datasets (e.g. to run
# two parts side by side on two cores). Training seeds (issue 12): SEEDS="1 2" KINDS="conv dynamic-diagonal"
# DATASETS=cifar-fs trains more seeds of those kinds (runs OUT/DS-KIND-sN; seed 0 is OUT/DS-KIND), each NSL
# seed paired with the conv model of the same seed on the same test episodes; then
# `python experiments/fewshot_table.py OUT` adds the spread over training seeds. TRAIN_EPISODES, VAL_EVERY,
# VAL_EPISODES and TEST_EPISODES override the episode counts (the test runs the script with a few episodes).
set -euo pipefail
DATA=${1:?usage: fewshot_cpu.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/fewshot-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

name() {  # dataset kind seed: the run's folder name (seed 0 has no suffix)
  if [ "$3" = 0 ]; then echo "$1-$2"; else echo "$1-$2-s$3"; fi
}

train() {  # dataset kind seed episodes extra-args...
  local ds=$1 kind=$2 seed=$3 eps=$4; shift 4
  local dir; dir="$OUT/$(name "$ds" "$kind" "$seed")"
  if [ -f "$dir/done" ]; then return; fi
  local resume=()
  if [ -f "$dir/checkpoints/last.pt" ]; then resume=(--resume); fi
  nsl fewshot train --dataset "$ds" --data-dir "$DATA" --backbone conv4 --layer "$kind" \
    --episodes "${TRAIN_EPISODES:-$eps}" --val-every "${VAL_EVERY:-500}" --val-episodes "${VAL_EPISODES:-200}" --seed "$seed" --out "$dir" --no-progress \
    --set checkpoint_every=250 "${resume[@]}" "$@"
  touch "$dir/done"
}

compare() {  # dataset kind seed ways shots: the test episodes are the same (--seed 0) for every training seed
  local ds=$1 kind=$2 seed=$3 ways=$4 shots=$5
  local run base; run=$(name "$ds" "$kind" "$seed"); base=$(name "$ds" conv "$seed")
  local f="$OUT/eval-$run-${ways}w${shots}s.json"
  if [ -f "$f" ]; then return; fi
  nsl fewshot eval --checkpoint "$OUT/$run/checkpoints/best.pt" --compare "$OUT/$base/checkpoints/best.pt" \
    --ways "$ways" --shots "$shots" --queries 15 --episodes "${TEST_EPISODES:-600}" --seed 0 --json --no-progress > "$f.tmp"
  mv "$f.tmp" "$f"
}

DATASETS=${DATASETS:-cifar-fs fc100 omniglot}
SEEDS=${SEEDS:-0}
for ds in $DATASETS; do
  if [ "$ds" = omniglot ]; then continue; fi
  kinds="conv static-full"
  if [ "$ds" = cifar-fs ]; then kinds="conv static-full dynamic-diagonal"; fi
  kinds=${KINDS:-$kinds}
  episodes=2000
  if [ "$ds" = fc100 ]; then episodes=1000; fi  # CPU budget: FC100 trained half as long (lr halved once)
  for seed in $SEEDS; do
    for kind in $kinds; do train "$ds" "$kind" "$seed" $episodes --ways 5 --shots 5 --queries 15 --lr-step 500; done
    for kind in $kinds; do
      if [ "$kind" = conv ]; then continue; fi  # the baseline is evaluated alongside each NSL kind
      for shots in 1 5; do compare "$ds" "$kind" "$seed" 5 "$shots"; done
    done
  done
done
if [[ " $DATASETS " != *" omniglot "* ]]; then echo "done: $DATASETS"; exit 0; fi
for kind in conv static-full; do
  train omniglot "$kind" 0 1500 --ways 5 --shots 1 --queries 5 --train-ways 20 --rotations --lr-step 400
done
for ways in 5 20; do for shots in 1 5; do
  compare omniglot static-full 0 "$ways" "$shots"
done; done
echo "all done: results in $OUT/eval-*.json"
