#!/usr/bin/env bash
# CPU-budget CIFAR-10 comparison of every layer kind (issue 3), paired seeds.
# Usage: bash experiments/cifar10_kinds_cpu.sh DATA_DIR [OUT_DIR]   (DATA_DIR: holds cifar-10-batches-py/)
# CNN-9 at half width (16-32-64 channels, the authors' layout), protocol `fast` (SGD nesterov, one-cycle lr 0.1,
# label smoothing 0.1), a fixed 10,000-image training subset (the same for every run), 400 steps of batch 64
# (2.56 epochs of the subset), tested on the full 10,000-image test set. Seeds 0 and 1 for every kind: the same
# seed gives the same data order and augmentation, so kinds are compared seed by seed (nsl report --baseline).
# One process, one thread; finished runs are skipped and interrupted ones resumed, so re-running continues.
# KINDS="..." and SEEDS="..." select a part of the grid, e.g. to run two parts side by side on two cores.
set -euo pipefail
DATA=${1:?usage: cifar10_kinds_cpu.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/cifar10-kinds-cpu}
KINDS=${KINDS:-conv static-diagonal static-full dynamic-diagonal dynamic-diagonal-cosine dynamic-filter dynamic-full}
SEEDS=${SEEDS:-0 1}
# shellcheck source=experiments/_cifar10_grid.sh
. "$(dirname "$0")/_cifar10_grid.sh"
run_grid "$DATA" "$OUT" --iters 400 --batch-size 64 --subset 10000
