# Shared by the CIFAR-10 grid scripts (sourced, not run): run_grid DATA OUT TRAIN_ARGS... trains CNN-9 at
# width 16 for every kind in $KINDS and seed in $SEEDS into OUT/KIND-sSEED with TRAIN_ARGS added, skipping
# finished runs (OUT/KIND-sSEED/done) and resuming interrupted ones, then writes the table with
# nsl report OUT/*-s? --baseline layer=conv --out OUT/report.
run_grid() {
  local data=$1 out=$2; shift 2
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  mkdir -p "$out"
  local kind seed dir resume
  for kind in $KINDS; do
    for seed in $SEEDS; do
      dir="$out/$kind-s$seed"
      if [ -f "$dir/done" ]; then continue; fi
      resume=()
      if [ -f "$dir/checkpoints/last.pt" ]; then resume=(--resume); fi
      nsl train --dataset cifar10 --data-dir "$data" --model cnn9 --set width=16 --layer "$kind" --protocol fast \
        --seed "$seed" --out "$dir" --no-progress "$@" "${resume[@]}"
      touch "$dir/done"
    done
  done
  nsl report "$out"/*-s? --baseline layer=conv --out "$out/report"
}
