#!/usr/bin/env sh
# Every method's tiny Fashion-MNIST recipe: pretrain, fine-tune with the CPU recipe
# (configs/finetune/fmnist.yaml) and the same recipe from scratch, robustness of both, then
# the README table (python scripts/finetune_table.py OUT). About 100 min on 2 CPU cores.
#   sh scripts/finetune_all.sh runs/finetune-all
set -eu
OUT=${1:-runs/finetune-all}
MIMAR=${MIMAR:-.venv/bin/mimar}
ROB_TEST=${ROB_TEST:-1000}  # robustness: the first N test images (71 passes over them)
run() {  # name recipe [overrides...]
  name=$1 recipe=$2
  shift 2
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
