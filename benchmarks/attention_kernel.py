"""ms/step of a recipe's pretext step and its backbone's classification step per precision and
attention kernel (``sdpa`` / ``matmul``), steps interleaved so that load hits all alike.

    python -m benchmarks.attention_kernel                                   # demo recipe
    python -m benchmarks.attention_kernel configs/aim/vit_tiny_fmnist.yaml --batch 128

The numbers behind ``auto`` in mimar/nn/attention.py (one thread by default).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import mimar
from mimar.bench.speed import Classifier, Stepper
from mimar.nn import set_attention_kernel

SETTINGS = [("fp32", "sdpa"), ("fp32", "matmul"), ("bf16", "sdpa"), ("bf16", "matmul")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/simmim/vit_tiny_fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=0, help="0: the recipe's data.batch_size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steppers, seconds = {}, {}
    for precision, kernel in SETTINGS:
        cfg = mimar.load_config(args.config, [*args.overrides, f"train.precision={precision}"])
        b = args.batch or cfg.data.batch_size
        images = torch.randn(b, cfg.backbone.in_chans, cfg.data.img_size, cfg.data.img_size)
        labels = torch.randint(0, 10, (b,))
        torch.manual_seed(0)
        method = mimar.build_method(cfg)
        torch.manual_seed(0)
        classifier = Classifier(mimar.build_backbone(cfg.backbone))
        for task, model, inputs in (
            (
                "pretext",
                method,
                lambda m=method, x=images, b=b: {"images": x, **m.sample_corruption(b)},
            ),
            ("classify", classifier, lambda x=images, y=labels: {"images": x, "labels": y}),
        ):
            steppers[task, precision, kernel] = Stepper(model, inputs, cfg)
    for i in range(args.warmup + args.steps):
        for (task, precision, kernel), stepper in steppers.items():
            set_attention_kernel(kernel)
            elapsed = stepper.step()
            if i >= args.warmup:
                seconds.setdefault((task, precision, kernel), []).append(elapsed)
    set_attention_kernel("auto")
    print(f"{args.config}: batch {b}, {args.threads} thread(s), median of {args.steps} steps")
    for task in ("pretext", "classify"):
        ms = {s: 1000 * statistics.median(seconds[(task, *s)]) for s in SETTINGS}
        row = "  ".join(f"{p} {k} {v:7.1f} ms" for (p, k), v in ms.items())
        fp32 = ms["fp32", "sdpa"]
        print(f"  {task:8s} {row}  bf16-matmul vs fp32-sdpa {fp32 / ms['bf16', 'matmul']:.2f}x")


if __name__ == "__main__":
    main()
