#!/usr/bin/env sh
# Dense transfer of every method's tiny Fashion-MNIST run (the runs of scripts/finetune_all.sh;
# the list: python3 scripts/methods.py): segmentation and detection on the scene benchmark,
# pretrained vs random init, and for the methods that pretrain a pyramid neck (iTPN) also their
# pretrained trunk with a re-initialised neck; then the table in docs/results.md. Names after OUT pick
# methods (default: all); TASKS picks the tasks; DENSE_ARGS is the budget. A finished run is
# reused, so an interrupted call continues where it stopped. Two halves side by side:
#   OMP_NUM_THREADS=1 sh scripts/dense_all.sh runs/finetune-all itpn itpn-clip &
#   OMP_NUM_THREADS=1 sh scripts/dense_all.sh runs/finetune-all simmim simmim-swin aim eva digpt
# (simmim-vit, the earlier name of simmim, is still accepted; its folder is now OUT/simmim.)
set -eu
OUT=${1:-runs/finetune-all}
[ $# -gt 0 ] && shift
PY=${PY:-python3}
NAMES=" ${*:-$($PY scripts/methods.py --names)} "
case "$NAMES" in *" simmim-vit "*)
  echo "note: simmim-vit is now called simmim (an earlier OUT: mv $OUT/simmim-vit $OUT/simmim)" >&2
  NAMES=$(echo "$NAMES" | sed 's/ simmim-vit / simmim /') ;;
esac
MIMAR=${MIMAR:-.venv/bin/mimar}
TASKS=${TASKS:-segment detect}
DENSE_ARGS=${DENSE_ARGS:-}
[ -f data/fmnist-scenes/annotations/instances_train.json ] || $MIMAR data scenes --out data/fmnist-scenes
METHODS=$($PY scripts/methods.py)
for task in $TASKS; do
  echo "$METHODS" | while read -r name _recipe _teacher neck; do
    case "$NAMES" in *" $name "*) ;; *) continue ;; esac
    dir=$OUT/$name
    # shellcheck disable=SC2086
    $MIMAR eval "$task" --checkpoint "$dir" --baselines $DENSE_ARGS dense.progress=false </dev/null
    if [ "$neck" = 1 ]; then
      # shellcheck disable=SC2086
      $MIMAR eval "$task" --checkpoint "$dir" --neck scratch $DENSE_ARGS dense.progress=false </dev/null
    fi
  done
done
$PY scripts/dense_table.py "$OUT"
