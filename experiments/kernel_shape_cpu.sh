#!/usr/bin/env bash
# CPU-budget kernel-shape curve on CIFAR-10 (issue 5): accuracy vs fraction of active kernel positions,
# learned shape (nsl.shape gates: relaxed -> hard top-k -> frozen) vs magnitude pruning of the same number of
# positions, both on static-full NSL layers, plus the dense model (9 of 9 positions). Paired seeds 0 and 1.
# Usage: bash experiments/kernel_shape_cpu.sh DATA_DIR [OUT_DIR]   (DATA_DIR: holds cifar-10-batches-py/)
# CNN-9 at half width (16-32-64), protocol `fast`, the fixed 10,000-image training subset, 600 steps of batch 64
# (3.84 epochs): 30% dense, then shaping (learned) or pruning (magnitude) and fine-tuning; full test set.
# One process, one thread; finished runs are skipped and interrupted ones resumed.
set -euo pipefail
DATA=${1:?usage: kernel_shape_cpu.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/kernel-shape-cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
run() {  # name seed extra-args...
  local dir="$OUT/$1-s$2" seed=$2; shift 2
  if [ -f "$dir/done" ]; then return; fi
  local resume=()
  if [ -f "$dir/checkpoints/last.pt" ]; then resume=(--resume); fi
  nsl train --dataset cifar10 --data-dir "$DATA" --model cnn9 --set width=16 --layer static-full --protocol fast \
    --iters 600 --batch-size 64 --subset 10000 --seed "$seed" --out "$dir" --no-progress "${resume[@]}" "$@"
  touch "$dir/done"
}
for seed in 0 1; do
  run dense-k9 "$seed"
  for k in 7 5 3 1; do
    run "learned-k$k" "$seed" --set shape_active=$k --set shape_method=learned
    run "magnitude-k$k" "$seed" --set shape_active=$k --set shape_method=magnitude
  done
done
# schedule ablation: the learned shape frozen earlier (relaxed 20%, hard top-k until 40% of the shaping part),
# leaving 60% of it for fine-tuning with the final shape, as magnitude pruning has all of it
for seed in 0 1; do
  for k in 3 5; do
    run "learned-early-k$k" "$seed" --set shape_active=$k --set shape_method=learned --set shape_warmup=0.2 \
      --set shape_freeze=0.4
  done
done
nsl report "$OUT"/*-s? --baseline shape_active=0 --out "$OUT/report"
