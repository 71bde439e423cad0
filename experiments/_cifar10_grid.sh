# Shared by the CIFAR-10 grid scripts (sourced, not run). Both train CNN-9 at width 16 into OUT/NAME-sSEED with
# TRAIN_ARGS added, skipping finished runs (OUT/NAME-sSEED/done) and resuming interrupted ones, then write the
# table with nsl report OUT/*-s? --baseline layer=conv --out OUT/report.
#   run_grid DATA OUT TRAIN_ARGS...      every kind in $KINDS (NAME = the kind) for every seed in $SEEDS, kind by kind
#   run_variants DATA OUT TRAIN_ARGS...  every variant in $VARIANTS for every seed in $SEEDS, seed by seed (seed 0
#                                        of every variant first); $VARIANTS holds one variant a line:
#                                        NAME KIND [KEY=VALUE ...] (the KEY=VALUEs go to nsl train as --set)

# run_one DIR KIND SEED DATA TRAIN_ARGS...: one run, skipped when DIR/done exists, resumed from its last checkpoint
run_one() {
  local dir=$1 kind=$2 seed=$3 data=$4; shift 4
  if [ -f "$dir/done" ]; then return 0; fi
  local resume=()
  if [ -f "$dir/checkpoints/last.pt" ]; then resume=(--resume); fi
  nsl train --dataset cifar10 --data-dir "$data" --model cnn9 --set width=16 --layer "$kind" --protocol fast \
    --seed "$seed" --out "$dir" --no-progress "$@" "${resume[@]}" || return
  touch "$dir/done"
}

run_grid() {
  local data=$1 out=$2; shift 2
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  mkdir -p "$out"
  local kind seed
  for kind in $KINDS; do
    for seed in $SEEDS; do
      run_one "$out/$kind-s$seed" "$kind" "$seed" "$data" "$@"
    done
  done
  nsl report "$out"/*-s? --baseline layer=conv --out "$out/report"
}

run_variants() {
  local data=$1 out=$2; shift 2
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  mkdir -p "$out"
  local seed line name kind opt
  local -a words sets
  for seed in $SEEDS; do
    while read -r line; do
      [ -z "$line" ] && continue
      read -r -a words <<< "$line"
      name=${words[0]} kind=${words[1]:?variant $name: no layer kind}
      sets=()
      for opt in "${words[@]:2}"; do sets+=(--set "$opt"); done
      run_one "$out/$name-s$seed" "$kind" "$seed" "$data" "$@" "${sets[@]}"
    done <<< "$VARIANTS"
  done
  nsl report "$out"/*-s? --baseline layer=conv --out "$out/report"
}
