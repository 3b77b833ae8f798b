"""ms per AdamW update of a recipe's backbone parameters for each PyTorch kernel, interleaved.

    python -m benchmarks.adamw                               # the demo ViT, one thread
    python -m benchmarks.adamw configs/simmim/vit_base_in1k.yaml --steps 10

The numbers behind ``optim.implementation`` (random gradients; the update only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mimar

KERNELS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/simmim/vit_tiny_fmnist.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = mimar.load_config(args.config)
    optimizers = {}
    for name, kernel in KERNELS.items():
        torch.manual_seed(0)
        params = list(mimar.build_backbone(cfg.backbone).parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers[name] = torch.optim.AdamW(params, lr=1e-3, **kernel)
    seconds: dict[str, list[float]] = {name: [] for name in KERNELS}
    for i in range(args.steps + 5):
        for name, optimizer in optimizers.items():
            tic = time.perf_counter()
            optimizer.step()
            if i >= 5:
                seconds[name].append(time.perf_counter() - tic)
    n = sum(p.numel() for p in optimizers["fused"].param_groups[0]["params"])
    print(f"{args.config}: {n / 1e6:.2f}M parameters, {args.threads} thread(s)")
    base = statistics.median(seconds["for-loop"])
    for name, s in seconds.items():
        med = statistics.median(s)
        print(f"  {name:8s} {1000 * med:8.2f} ms  ({base / med:.2f}x for-loop)")


if __name__ == "__main__":
    main()
