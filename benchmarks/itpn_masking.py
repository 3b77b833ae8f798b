"""Images/s of an iTPN step with 75 % of the main patches dropped vs the same step unmasked.

    python benchmarks/itpn_masking.py                     # the CPU demo recipe, bf16
    python benchmarks/itpn_masking.py configs/itpn/hivit_base_in1k.yaml data.batch_size=8 \
        train.precision=fp32 --steps 3 --warmup 1

Both steps run forward + backward + AdamW of the same model on the same batch and precision;
only ``keep_ids`` differs: a random quarter of the main patches (what pretraining does) or all
of them. HiViT and the pyramid neck never compute a dropped patch, so the masked step is
cheaper; the pixel decoder always runs on all N patches, and with MFM the EMA teacher always
sees the full image, so the ratio is printed with and without MFM.
"""

from __future__ import annotations

import argparse

import torch

import mimar
from mimar.bench.speed import Stepper, images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/itpn/hivit_tiny_fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = mimar.load_config(args.config, args.overrides)
    if base.method.name != "itpn":
        raise SystemExit(f"{args.config} is not an iTPN recipe")
    b, c, s = base.data.batch_size, base.backbone.in_chans, base.data.img_size
    images = torch.randn(b, c, s, s)
    print(
        f"{args.config}: batch {b}, {s} px, {base.train.precision}, "
        f"{args.threads} threads, {args.steps} timed steps"
    )
    for mfm in (False, True):
        cfg = mimar.load_config(args.config, [*args.overrides, f"method.mfm={str(mfm).lower()}"])
        steppers = {}
        for name in ("masked", "full"):
            torch.manual_seed(0)
            method = mimar.build_method(cfg)
            if name == "masked":
                inputs = lambda m=method: {"images": images, **m.sample_corruption(b)}
            else:
                every = torch.arange(method.num_patches).expand(b, -1)
                inputs = lambda every=every: {"images": images, "keep_ids": every}
            steppers[name] = Stepper(method, inputs, cfg)
        speed = images_per_s(steppers, b, args.steps, args.warmup)
        label = "pixel + MFM" if mfm else "pixel only "
        kept = f"{method.num_keep}/{method.num_patches}"
        print(f"  {label}  {kept} patches kept {speed['masked']:8.1f} images/s")
        print(f"  {label}  all patches       {speed['full']:8.1f} images/s")
        print(f"  {label}  ratio (masked / full) {speed['masked'] / speed['full']:.2f}x")


if __name__ == "__main__":
    main()
