"""Images/s of RandAugment: timm's PIL transform per image vs mimar's batched tensor version.

    python benchmarks/randaugment.py                      # 256 images, 28x28 gray and 32x32 RGB
    python benchmarks/randaugment.py --spec rand-m9-mstd0.5-inc1 --batch 256 --repeats 15
    python benchmarks/randaugment.py --shapes 3x224 --batch 64 --repeats 5

(a) "per image": timm's ``rand_augment_transform`` on one PIL image at a time, with Python's
``random`` and numpy's global state seeded per image from a torch draw (timm draws its op
choice from ``np.random`` and everything else from ``random``) and restored afterwards; this
is what a generator-exact loader would have to do. Includes the uint8 tensor <-> PIL copies.
(b) "batched": ``mimar.data.randaugment.BatchRandAugment``: draws for the batch, then each op
runs once on the images that drew it. Both use bicubic resampling and the same fill.

The two run alternately, repeat by repeat, on one thread; medians are printed. Pillow >= 10
raises on timm's 0-bit posterize (magnitude 10 after the noise); (a) counts those images and
leaves them unaugmented, so its time is, if anything, flattered.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from mimar.data.randaugment import BatchRandAugment


class PerImageTimm:
    """timm's PIL RandAugment, exact per image through reseeded global RNG states."""

    def __init__(self, spec: str, fill: tuple[int, ...]) -> None:
        hparams = {"img_mean": fill if len(fill) == 3 else fill[0], "interpolation": 3}
        self.transform = rand_augment_transform(spec, hparams)  # 3 = PIL bicubic
        self.failures = 0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(2**32, (len(images),), generator=generator).tolist()
        out = torch.empty_like(images)
        saved = random.getstate(), np.random.get_state()
        try:
            for i, seed in enumerate(seeds):
                random.seed(seed)
                np.random.seed(seed)
                array = images[i].permute(1, 2, 0).numpy()
                img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
                try:
                    img = self.transform(img)
                except ValueError:  # Pillow >= 10: "bits must be between or equal to 1 and 8"
                    self.failures += 1
                pixels = np.array(img).reshape(array.shape)  # a writable copy
                out[i] = torch.from_numpy(pixels).permute(2, 0, 1)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        return out


class Batched:
    def __init__(self, spec: str, fill: tuple[int, ...]) -> None:
        self.augment = BatchRandAugment(spec, fill)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        draws = self.augment.sample(len(images), generator)
        return self.augment(images.float(), draws).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="rand-m9-mstd0.5-inc1")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="1x28,3x32", help="CxS pairs, e.g. 3x224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.spec}, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}")
    for shape in args.shapes.split(","):
        chans, size = (int(v) for v in shape.split("x"))
        images = torch.randint(0, 256, (args.batch, chans, size, size), dtype=torch.uint8)
        fill = (128,) * chans
        variants = {"per image (timm PIL)": PerImageTimm(args.spec, fill)}
        variants["batched (mimar)"] = Batched(args.spec, fill)
        seconds = {name: [] for name in variants}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, run in variants.items():
                generator = torch.Generator().manual_seed(repeat)
                tic = time.perf_counter()
                run(images, generator)
                if repeat:
                    seconds[name].append(time.perf_counter() - tic)
        for name, times in seconds.items():
            speed = args.batch / statistics.median(times)
            print(f"  {chans}x{size}x{size}  {name:22s} {speed:9.0f} images/s")
        failures = variants["per image (timm PIL)"].failures
        total = (args.repeats + 1) * args.batch
        print(f"  {chans}x{size}x{size}  timm PIL posterize errors: {failures} of {total} images")


if __name__ == "__main__":
    main()
