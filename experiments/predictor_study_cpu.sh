#!/usr/bin/env bash
# Predictor study on a 2-core CPU (issue 17, part 3): which dynamic predictor keeps the gain of dynamic NSL at a
# fraction of its cost. Same protocol as cifar10_full_cpu.sh (all 50,000 training images, CNN-9 width 16, protocol
# `fast`, 5 epochs of batch 128, all 10,000 test images, seeds 0-2 paired by seed with the conv runs), one run per
# variant and seed in OUT/VARIANT-sSEED; conv runs are OUT/conv-sSEED, shared with cifar10_full_cpu.sh given the
# same OUT. Seed 0 of every variant runs first (a frontier early), then seeds 1 and 2. Finished runs are skipped and
# interrupted ones resumed: re-run the same command to continue.
# Usage: bash experiments/predictor_study_cpu.sh DATA_DIR [OUT_DIR]     (DATA_DIR holds cifar-10-batches-py/)
# VARIANTS (one a line: NAME KIND [KEY=VALUE ...], the KEY=VALUEs passed as --set) and SEEDS select a part.
# Then: nsl report OUT/*-s? --baseline layer=conv --out OUT/report
set -euo pipefail
DATA=${1:?usage: predictor_study_cpu.sh DATA_DIR [OUT_DIR]}
OUT=${2:-runs/predictor-study-cpu}
SEEDS=${SEEDS:-0 1 2}
VARIANTS=${VARIANTS:-"conv conv
sphere64-half dynamic-diagonal predictor_stride=2
sphere64-stage-half dynamic-diagonal share_prediction=true predictor_stride=2
sphere64-stage dynamic-diagonal share_prediction=true
sphere16 dynamic-diagonal predictor_width=16
light-group dynamic-diagonal-light predictor_norm=group
light64 dynamic-diagonal-light predictor_width=64
sphere16-stage-half dynamic-diagonal share_prediction=true predictor_stride=2 predictor_width=16
sphere64-global dynamic-diagonal predictor_stride=0
sphere64-stage-global dynamic-diagonal share_prediction=true predictor_stride=0"}
# shellcheck source=experiments/_cifar10_grid.sh
. "$(dirname "$0")/_cifar10_grid.sh"
run_variants "$DATA" "$OUT" --epochs 5 --batch-size 128 --set checkpoint_every=100
