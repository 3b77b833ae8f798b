#!/usr/bin/env sh
# Every method's tiny Fashion-MNIST recipe: pretrain, fine-tune with the CPU recipe
# (configs/finetune/fmnist.yaml) and the same recipe from scratch, robustness of both, then
# the table of docs/results.md. Names after OUT pick methods (default: all, in this order); a
# step whose output exists is skipped, so an interrupted call continues. That table ran as two
# halves side by side, one thread each (eva and digpt use the simmim-vit run as teacher):
#   OMP_NUM_THREADS=1 sh scripts/finetune_all.sh runs/finetune-all simmim-vit eva digpt &
#   OMP_NUM_THREADS=1 sh scripts/finetune_all.sh runs/finetune-all simmim-swin aim itpn
set -eu
OUT=${1:-runs/finetune-all}
[ $# -gt 0 ] && shift
NAMES=${*:-simmim-vit simmim-swin eva aim itpn digpt}
MIMAR=${MIMAR:-.venv/bin/mimar}
ROB_TEST=${ROB_TEST:-1000}  # robustness: the first N test images (71 passes over them)
run() {  # name recipe [overrides...]
  name=$1 recipe=$2
  shift 2
  case " $NAMES " in *" $name "*) ;; *) return 0 ;; esac
  dir=$OUT/$name
  [ -f "$dir/checkpoints/last.pt" ] || $MIMAR pretrain "$recipe" --run-dir "$dir" train.progress=false "$@"
  [ -f "$dir/eval/finetune.json" ] || $MIMAR eval finetune --checkpoint "$dir" --baselines finetune.progress=false
  [ -f "$dir/eval/robustness.json" ] || $MIMAR eval robustness --checkpoint "$dir" --baselines --max-test "$ROB_TEST"
}
run simmim-vit configs/simmim/vit_tiny_fmnist.yaml
run simmim-swin configs/simmim/swin_tiny_fmnist.yaml
run eva configs/eva/vit_tiny_fmnist.yaml teacher.kind=mimar "teacher.path=$OUT/simmim-vit"
run aim configs/aim/vit_tiny_fmnist.yaml
run itpn configs/itpn/hivit_tiny_fmnist.yaml
run digpt configs/digpt/vit_tiny_fmnist.yaml teacher.kind=mimar "teacher.path=$OUT/simmim-vit"
python3 scripts/finetune_table.py "$OUT"
