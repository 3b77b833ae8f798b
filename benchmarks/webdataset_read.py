"""Images/s of reading WebDataset shards vs an image folder, the same images, 2 workers.

    OMP_NUM_THREADS=1 python benchmarks/webdataset_read.py               # 1200 JPEGs, 160 px
    python benchmarks/webdataset_read.py --images 5000 --size 160 --workers 4 --repeats 3

Builds ``--images`` random-noise JPEGs (2 class folders) in a temporary folder, packs them with
``mimar data shard``'s writer (``--shard-size``), then times, alternately, repeat by repeat:

(a) "image folder": ``load_image_folder`` (a file per image; decode, resize, center crop into
    memory in ``--workers`` DataLoader workers), the reader of ``data.name=image_folder``;
(b) "shards, eval reader": ``load_shards``, the same decode/resize/crop over tar shards (what
    ``mimar eval`` does with a webdataset root): the file format is the only difference;
(c) "shards, train stream": one epoch of ``ShardLoader`` batches (decode, random resized crop,
    flip, normalise per sample in the workers), the reader of ``data.name=webdataset``.

Each timing includes starting the workers. The order of the three rotates from repeat to
repeat (on this machine whichever runs second in a row is slowed down). Files are in the page
cache after the first repeat (for all three alike): this measures decoding and format
overhead, not a disk. Medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mimar.data import DataConfig
from mimar.data.image_folder import load_image_folder
from mimar.data.shard_loader import build_shard_loader
from mimar.data.shard_writer import write_shards
from mimar.data.shards import load_shards
from mimar.data.sources import normalization_stats


def build_folder(root: Path, images: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        # smooth noise, so the JPEGs are of a natural size rather than incompressible
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        img.save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--size", type=int, default=160, help="stored image side in pixels")
    p.add_argument("--img-size", type=int, default=64, help="output side of the readers")
    p.add_argument("--shard-size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=50, help="train stream: batch size")
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "imgs", Path(tmp) / "shards"
        build_folder(folder, args.images, args.size)
        summary = write_shards(folder, f"{out}/train-%06d.tar", shard_size=args.shard_size)
        common = {"img_size": args.img_size, "in_chans": 3, "num_workers": args.workers}
        folder_cfg = DataConfig(name="image_folder", root=str(folder), **common)
        shard_cfg = DataConfig(
            name="webdataset", root=summary["root"], batch_size=args.batch, **common
        )
        mean, std = normalization_stats(shard_cfg)

        def stream() -> int:
            loader = build_shard_loader(shard_cfg, mean, std, seed=0)
            steps = loader.steps_per_epoch
            for step in range(steps):
                loader.inputs(step)
            return steps * args.batch

        readers = {
            "image folder": lambda: len(load_image_folder(folder_cfg, "train")),
            "shards, eval reader": lambda: len(load_shards(shard_cfg, "train")),
            "shards, train stream": stream,
        }
        rates: dict[str, list[float]] = {name: [] for name in readers}
        names = list(readers)
        for repeat in range(args.repeats):  # each repeat starts with the next reader: a
            for k in range(len(names)):  # reader that runs right after another one is slower
                name = names[(repeat + k) % len(names)]
                read = readers[name]
                start = time.perf_counter()
                n = read()
                rates[name].append(n / (time.perf_counter() - start))
        mib = sum(f.stat().st_size for f in out.glob("*.tar")) / 2**20
        print(
            f"{args.images} JPEGs of {args.size}x{args.size} px ({mib:.1f} MiB in "
            f"{summary['shards']} shards) -> {args.img_size} px, {args.workers} workers, "
            f"median of {args.repeats}:"
        )
        base = statistics.median(rates["image folder"])
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"  {name:<22} {median:8.0f} images/s  ({median / base:.2f}x image folder)")


if __name__ == "__main__":
    main()
