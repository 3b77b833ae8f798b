"""Images/s of frozen-feature extraction, the bulk of ``mimar eval knn linear``, per setting.

    python -m benchmarks.eval_speed                          # the demo ViT, 2 threads
    python -m benchmarks.eval_speed configs/aim/vit_tiny_fmnist.yaml --images 4096
    python -m benchmarks.eval_speed --probes                 # kNN + linear probe, 60k x 128

The recipe's backbone at its random initialisation (speed does not depend on the weights), in
the recipe's precision, over the first ``--images`` Fashion-MNIST training images. The settings
alternate pass by pass so that load hits all alike; medians of ``--reps`` passes:

- ``batch 256, intra-op``: one forward per batch of 256 with torch's ``--threads`` intra-op
  threads (mimar before the change);
- ``pieces of 64, intra-op``: the same in pieces of 64 images;
- ``pieces of 64, workers``: one worker thread per core, one intra-op thread each (the default
  of mimar.evaluation.features).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

import mimar
from mimar.data import iterate_eval_batches, load_images
from mimar.engine.precision import autocast_dtype
from mimar.evaluation import features

SETTINGS = {  # name -> (CPU_CHUNK, CPU_WORKERS, CPU_FUSED)
    "batch 256, intra-op": (256, False, False),
    "pieces of 64, intra-op": (64, False, False),
    "pieces of 64, workers": (64, True, False),
    "pieces of 64, workers, fused": (64, True, True),
    "pieces of 128, workers, fused": (128, True, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/simmim/vit_tiny_fmnist.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value")
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probes", action="store_true", help="time the probes, not extraction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probes:
        return probes(args.reps)
    cfg = mimar.load_config(args.config, args.overrides)
    torch.manual_seed(0)
    backbone = mimar.build_backbone(cfg.backbone)
    data = load_images(replace(cfg.data, max_images=args.images), "train")
    dtype = autocast_dtype(cfg.train.precision)
    seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
    reference, drift = None, 0.0
    for rep in range(args.reps + 1):  # the first round warms up
        for name, (chunk, workers, fused) in SETTINGS.items():
            features.CPU_CHUNK, features.CPU_WORKERS, features.CPU_FUSED = chunk, workers, fused
            tic = time.perf_counter()
            feats, _ = features.extract_features(
                backbone, iterate_eval_batches(data, cfg.data.img_size, 256), autocast_dtype=dtype
            )
            if rep:
                seconds[name].append(time.perf_counter() - tic)
            reference = feats if reference is None else reference
            drift = max(drift, (feats - reference).abs().max().item())
    print(
        f"{args.config}: {len(data)} images, {cfg.train.precision}, {args.threads} threads, "
        f"median of {args.reps} passes (features differ by at most {drift:.1e} between settings)"
    )
    base = statistics.median(seconds[next(iter(SETTINGS))])
    for name, s in seconds.items():
        t = statistics.median(s)
        print(f"  {name:24s} {len(data) / t:7.0f} img/s  {base / t:.2f}x")


def probes(reps: int) -> None:
    """Seconds of ``mimar eval knn linear``'s two probes on the full Fashion-MNIST's shapes:
    60k train / 10k test features of width 128 in 10 classes (Gaussian clusters)."""
    from mimar.evaluation.knn import knn_classify
    from mimar.evaluation.linear import linear_probe

    gen = torch.Generator().manual_seed(0)
    y_train, y_test = torch.randint(0, 10, (60000,), generator=gen), torch.arange(10000) % 10
    centres = torch.randn(10, 128, generator=gen)
    x_train = centres[y_train] + 4 * torch.randn(60000, 128, generator=gen)
    x_test = centres[y_test] + 4 * torch.randn(10000, 128, generator=gen)
    runs = {
        "kNN (k=20)": lambda: knn_classify(x_train, y_train, x_test, y_test),
        "linear probe (30 epochs, 4 lrs)": lambda: linear_probe(
            x_train, y_train, x_test, y_test, epochs=30
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    top1 = {}
    for _ in range(reps):
        for name, run in runs.items():
            tic = time.perf_counter()
            top1[name] = run()["top1"]
            seconds[name].append(time.perf_counter() - tic)
    for name, s in seconds.items():
        print(f"  {name:32s} {statistics.median(s):6.2f} s  (top-1 {top1[name]:.2f})")


if __name__ == "__main__":
    main()
