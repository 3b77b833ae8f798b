#!/usr/bin/env bash
# One prepared GPU check (<= ~8 minutes on one H100): `mimar bench speed` on every paper
# recipe that fits one GPU, at a realistic batch, on synthetic data, fp32 and bf16, then a
# 200-step real `mimar pretrain` (AIM tiny recipe on Fashion-MNIST, monitor on), each with
# train.compile off and on. Writes OUT/gpu.json and OUT/gpu.md (one table).
#
#   bash benchmarks/gpu.sh                         # --device cuda, paper recipes, OUT=runs/gpu
#   bash benchmarks/gpu.sh --device cpu --tiny     # the CI form (tests/test_monitor.py): tiny
#                                                  # recipes, a few steps, synthetic data
# Both parts run with train.compile off and on (`mimar bench speed` compiles the forward as
# `mimar pretrain` does; the compile time falls in its warm-up steps); the pretrain's rows
# carry step_s, perf/mfu and data_wait_s.
set -euo pipefail
DEVICE=cuda TINY=0 OUT=runs/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1 (--device cpu|cuda, --tiny, --out DIR)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python}"
mkdir -p "$OUT"
if [ "$TINY" = 1 ]; then
  SPEED=("configs/simmim/vit_tiny_fmnist.yaml:8")
  STEPS=(--steps 2 --warmup 1)
  PRE=(configs/simmim/vit_tiny_fmnist.yaml data.name=synthetic data.synthetic_size=64
       data.batch_size=16 data.img_size=16 backbone.img_size=16 backbone.embed_dim=32
       backbone.depth=2 backbone.num_heads=2 method.mask_patch_size=8 train.steps=6
       train.monitor_every=3 train.monitor_bank=32 train.monitor_queries=16)
  COMPILE=(false)
else
  SPEED=(configs/simmim/vit_base_in1k.yaml:128 configs/simmim/swin_base_in1k.yaml:128
         configs/eva/vit_base_clip_l14_in1k.yaml:128 configs/itpn/hivit_base_in1k.yaml:128
         configs/aim/aim_600m.yaml:32 configs/digpt/vit_base_clip_in1k.yaml:64)
  STEPS=(--steps 10 --warmup 3)
  PRE=(configs/aim/vit_tiny_fmnist.yaml train.steps=200 train.monitor_every=100)
  COMPILE=(false true)
fi
for compile in "${COMPILE[@]}"; do
  for entry in "${SPEED[@]}"; do
    recipe="${entry%%:*}" batch="${entry##*:}"
    name="$(basename "$(dirname "$recipe")")_$(basename "$recipe" .yaml)_compile_$compile"
    "$PY" -m mimar.cli bench speed --device "$DEVICE" --recipe "$recipe" --batch "$batch" \
      "${STEPS[@]}" --no-classify --json "$OUT/speed_$name.json" data.name=synthetic \
      train.compile="$compile"
  done
done
for compile in "${COMPILE[@]}"; do
  rm -rf "$OUT/pretrain_compile_$compile"
  "$PY" -m mimar.cli pretrain "${PRE[@]}" train.device="$DEVICE" train.compile="$compile" \
    train.progress=false --run-dir "$OUT/pretrain_compile_$compile"
done
"$PY" - "$OUT" "$DEVICE" <<'PY'
import json, statistics, sys, time
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
rows = []
for path in sorted(out.glob("speed_*.json")):
    report = json.loads(path.read_text())
    for rec in report["recipes"]:
        for r in rec["rows"]:
            rows.append({"what": f"bench speed {rec['recipe'].split('configs/')[-1]}",
                         "batch": rec["batch"], "precision": r["precision"],
                         "compile": path.stem.endswith("compile_true"),
                         "img_s": r["images_per_s"], "ms_step": r["ms_per_step"],
                         "gflop_step": r["gflop_per_step"], "mfu": None})
    machine = report["machine"]
for run in sorted(out.glob("pretrain_compile_*")):
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l]
    train = [m for m in metrics if "loss" in m][len(metrics) // 10:]  # after warm-up
    knn = [m["monitor/knn_top1"] for m in metrics if "monitor/knn_top1" in m]
    rows.append({"what": "pretrain (monitor on)", "batch": None, "precision": "recipe",
                 "compile": run.name.endswith("true"),
                 "img_s": statistics.median(m["images_per_s"] for m in train),
                 "ms_step": 1000 * statistics.median(m["step_s"] for m in train),
                 "gflop_step": train[-1]["perf/flops_per_step"] / 1e9,
                 "mfu": statistics.median(m["perf/mfu"] for m in train) if "perf/mfu" in train[-1] else None,
                 "data_wait_share": statistics.median(m["data_wait_s"] / m["step_s"] for m in train),
                 "online_knn": knn[-1] if knn else None})
doc = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "device": device,
       "gpu": machine.get("gpu"), "cpu": machine.get("cpu"), "torch": machine.get("torch"), "rows": rows}
(out / "gpu.json").write_text(json.dumps(doc, indent=1))
lines = [f"{doc['date']}, {doc['gpu'] or doc['cpu']}, torch {doc['torch']}", "",
         "| what | batch | precision | compile | img/s | ms/step | GFLOP/step | MFU |", "|---|---|---|---|---|---|---|---|"]
for r in rows:
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    lines.append(f"| {r['what']} | {r['batch'] or '-'} | {r['precision']} | {r['compile']} | "
                 f"{r['img_s']:.1f} | {r['ms_step']:.1f} | {r['gflop_step']:.2f} | {mfu} |")
(out / "gpu.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
