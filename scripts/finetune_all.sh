#!/usr/bin/env sh
# Every method's tiny Fashion-MNIST recipe (the list: python3 scripts/methods.py, read from
# mimar/names.py): pretrain, fine-tune with the CPU recipe (configs/finetune/fmnist.yaml) and
# the same recipe from scratch, robustness of both, then the table in docs/results.md. Names after OUT pick
# methods (default: all, in this order); a step whose output exists is skipped, so an
# interrupted call continues. The methods with a frozen teacher (eva, itpn-clip, digpt) use the
# simmim run as teacher, so it runs first. Two halves side by side, one thread each:
#   OMP_NUM_THREADS=1 sh scripts/finetune_all.sh runs/finetune-all simmim eva digpt itpn-clip &
#   OMP_NUM_THREADS=1 sh scripts/finetune_all.sh runs/finetune-all simmim-swin aim itpn
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
ROB_TEST=${ROB_TEST:-1000}  # robustness: the first N test images (71 passes over them)
$PY scripts/methods.py | while read -r name recipe teacher _neck; do
  case "$NAMES" in *" $name "*) ;; *) continue ;; esac
  dir=$OUT/$name
  set --  # the recipe's overrides
  [ "$teacher" = 1 ] && set -- teacher.kind=mimar "teacher.path=$OUT/simmim"
  # </dev/null: the commands must not read the method list this loop reads
  [ -f "$dir/checkpoints/last.pt" ] || $MIMAR pretrain "$recipe" --run-dir "$dir" train.progress=false "$@" </dev/null
  [ -f "$dir/eval/finetune.json" ] || $MIMAR eval finetune --checkpoint "$dir" --baselines finetune.progress=false </dev/null
  [ -f "$dir/eval/robustness.json" ] || $MIMAR eval robustness --checkpoint "$dir" --baselines --max-test "$ROB_TEST" </dev/null
done
$PY scripts/finetune_table.py "$OUT"
