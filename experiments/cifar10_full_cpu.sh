#!/usr/bin/env bash
# Full-data CIFAR-10 study on a 2-core CPU (issue 12, part 2): all 50,000 training images, CNN-9 at width 16,
# protocol `fast` (SGD nesterov, one-cycle lr 0.1, label smoothing 0.1, BN momentum 0.1) for 5 epochs of
# batch 128 (1,950 steps), tested on all 10,000 test images; kinds conv, static-full, dynamic-diagonal and
# dynamic-diagonal-light, seeds 0-2 (a seed fixes the data order and augmentation: kinds are paired by seed).
# Usage: bash experiments/cifar10_full_cpu.sh DATA_DIR [OUT_DIR]     (DATA_DIR holds cifar-10-batches-py/)
# Budget (measured in these runs, one thread each, two runs sharing the 2-core CPU): conv and static-full
# about 0.35 s a step (11 min a run), dynamic-diagonal-light 0.76 s (25 min), dynamic-diagonal 2.4 s (80 min),
# about 6.5 hours of one core for the grid: the cheap kinds run first, then the dynamic ones, seed by seed. Finished runs are skipped and interrupted ones resumed,
# so the script can be re-run to completion; KINDS="..." and SEEDS="..." select a part of the grid (e.g. two
# parts side by side, one per core). Then: nsl report OUT/*-s? --baseline layer=conv --out OUT/report
set -euo pipefail
DATA=${1:?usage: cifar10_full_cpu.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/cifar10-full-cpu}
KINDS=${KINDS:-conv static-full dynamic-diagonal-light dynamic-diagonal}
SEEDS=${SEEDS:-0 1 2}
# shellcheck source=experiments/_cifar10_grid.sh
. "$(dirname "$0")/_cifar10_grid.sh"
run_grid "$DATA" "$OUT" --epochs 5 --batch-size 128 --set checkpoint_every=100
