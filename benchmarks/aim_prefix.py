"""ms/step of AIM's prefix-causal step against the same step with plain causal attention.

    python -m benchmarks.aim_prefix                      # the tiny AIM recipe, fp32 and bf16
    python -m benchmarks.aim_prefix --threads 1 --steps 20

Three steps of the same network, interleaved step by step so that load hits them alike:
``prefix-causal`` (the recipe: S ~ U{1..N-1} per image, one (B, N, N) mask), ``prefix 1``
(S = 1 for every image: the same mask shape, almost causal) and ``causal (N, N)`` (one
lower-triangular mask shared by the batch, the cheapest causal form). Attention runs with the
kernel ``train.attention_kernel=auto`` picks, as ``mimar pretrain`` does.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import mimar
import mimar.methods.aim as aim
from mimar.bench.speed import Stepper

VARIANTS = {
    "prefix-causal": [],
    "prefix 1": ["method.prefix_min=1", "method.prefix_max=1"],
    "causal (N, N)": [],
}


def shared_causal_mask(prefix_len: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """One ``(N, N)`` lower-triangular mask for the whole batch (S = 0 for every image)."""
    return torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=prefix_len.device).tril()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/aim/vit_tiny_fmnist.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prefix_mask = aim.prefix_causal_mask
    for precision in ("fp32", "bf16"):
        steppers = {}
        for name, overrides in VARIANTS.items():
            cfg = mimar.load_config(args.config, [*overrides, f"train.precision={precision}"])
            b, s = cfg.data.batch_size, cfg.data.img_size
            images = torch.randn(b, cfg.backbone.in_chans, s, s)
            torch.manual_seed(0)
            method = mimar.build_method(cfg)
            inputs = lambda m=method, x=images, b=b: {"images": x, **m.sample_corruption(b)}
            steppers[name] = Stepper(method, inputs, cfg)
        seconds: dict[str, list[float]] = {name: [] for name in steppers}
        for i in range(args.warmup + args.steps):
            for name, stepper in steppers.items():
                aim.prefix_causal_mask = shared_causal_mask if "(N, N)" in name else prefix_mask
                elapsed = stepper.step()
                if i >= args.warmup:
                    seconds[name].append(elapsed)
        aim.prefix_causal_mask = prefix_mask
        ms = {name: 1000 * statistics.median(v) for name, v in seconds.items()}
        row = "  ".join(f"{name} {v:6.1f} ms" for name, v in ms.items())
        ratio = ms["causal (N, N)"] / ms["prefix-causal"]
        print(f"{precision}: {row}  causal / prefix-causal {ratio:.2f}x")
    print(f"{args.config}: batch {b}, {args.threads} thread(s), median of {args.steps} steps")


if __name__ == "__main__":
    main()
