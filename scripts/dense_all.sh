#!/usr/bin/env sh
# Dense transfer of every method's tiny Fashion-MNIST run (the runs of scripts/finetune_all.sh):
# segmentation and detection on the scene benchmark, pretrained vs random init, and for iTPN
# also its pretrained trunk with a re-initialised neck; then the table in results.md. Names after OUT
# pick methods (default: all); TASKS picks the tasks; DENSE_ARGS is the budget. A finished run
# is reused, so an interrupted call continues where it stopped. That table:
#   OMP_NUM_THREADS=1 sh scripts/dense_all.sh runs/finetune-all itpn &
#   OMP_NUM_THREADS=1 sh scripts/dense_all.sh runs/finetune-all simmim-vit simmim-swin aim eva digpt
set -eu
OUT=${1:-runs/finetune-all}
[ $# -gt 0 ] && shift
NAMES=${*:-simmim-vit simmim-swin eva aim itpn digpt}
MIMAR=${MIMAR:-.venv/bin/mimar}
TASKS=${TASKS:-segment detect}
DENSE_ARGS=${DENSE_ARGS:-}
[ -f data/fmnist-scenes/annotations/instances_train.json ] || $MIMAR data scenes --out data/fmnist-scenes
for task in $TASKS; do
  for name in $NAMES; do
    dir=$OUT/$name
    # shellcheck disable=SC2086
    $MIMAR eval "$task" --checkpoint "$dir" --baselines $DENSE_ARGS dense.progress=false
    if [ "$name" = itpn ]; then
      # shellcheck disable=SC2086
      $MIMAR eval "$task" --checkpoint "$dir" --neck scratch $DENSE_ARGS dense.progress=false
    fi
  done
done
python3 scripts/dense_table.py "$OUT"
