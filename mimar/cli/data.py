"""``mimar data scenes | shard | index``: build data sets."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    da = sub.add_parser("data", help="build datasets")
    data_sub = da.add_subparsers(dest="data_command", required=True)
    sc = data_sub.add_parser(
        "scenes",
        help="Fashion-MNIST scenes: a small dense benchmark in COCO format",
        description="Paste 1-4 Fashion-MNIST items on textured canvases; write images, "
        "semantic label maps and COCO instances (boxes, RLE masks). Deterministic in --seed.",
    )
    sc.add_argument("--out", required=True, help="output folder, e.g. data/fmnist-scenes")
    sc.add_argument("--size", type=int, default=64, help="canvas side in pixels (>= 16)")
    sc.add_argument("--num-train", type=int, default=4000, help="train canvases")
    sc.add_argument("--num-test", type=int, default=1000, help="test canvases")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument(
        "--fmnist-root",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the Fashion-MNIST idx files",
    )
    sc.set_defaults(func=scenes)
    sh = data_sub.add_parser(
        "shard",
        help="pack an image folder into WebDataset shards (data.name=webdataset)",
        description="Write IMAGE_FOLDER's images (labels from class sub-folders) as tar shards "
        "of --shard-size samples in a random order from --seed, their encoded bytes unchanged, "
        "plus shards.json (classes, sample counts) beside them.",
    )
    sh.add_argument("folder", metavar="IMAGE_FOLDER", help="one split's images, e.g. data/train")
    sh.add_argument(
        "pattern", metavar="PATTERN", help="shard names, e.g. 'OUT_DIR/train-%%06d.tar'"
    )
    sh.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sh.add_argument(
        "--seed", type=int, default=0, help="seed of the order the samples are written in"
    )
    sh.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same command (its complete shards are kept)",
    )
    sh.add_argument(
        "--on-bad-image",
        choices=("error", "skip"),
        default="error",
        help="an image PIL cannot read: stop with its path (error) or leave it out (skip)",
    )
    sh.set_defaults(func=shard)
    ix = data_sub.add_parser(
        "index",
        help="write shards.json for shards another tool wrote (readers refuse shards without)",
        description="Count the samples of each shard once from its tar headers and write "
        "shards.json beside them (data shard writes it itself), so that training and "
        "evaluation read the shards; existing entries of other shards stay.",
    )
    ix.add_argument(
        "pattern",
        metavar="PATTERN",
        help="the shards, as data.root names them: 'DIR/train-{000000..000009}.tar' or "
        "'DIR/val-*.tar'",
    )
    ix.add_argument(
        "--classes",
        help="class names in label order: a,b,c or a text file with one name a line "
        "(default: those of an existing shards.json there)",
    )
    ix.set_defaults(func=index)


def scenes(args) -> int:
    from mimar.dense.scenes import build_scenes

    summary = build_scenes(
        args.out,
        fmnist_root=args.fmnist_root,
        size=args.size,
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
    )
    images, instances = summary["images"], summary["instances"]
    print(
        f"wrote {images['train']} train + {images['test']} test scenes "
        f"({instances['train']} + {instances['test']} instances) to {summary['out']} "
        f"in {summary['seconds']:.1f} s"
    )
    return 0


def index(args) -> int:
    from pathlib import Path

    from mimar.data.shard_writer import index_shards

    classes = None
    if args.classes:
        path = Path(args.classes)
        words = path.read_text().splitlines() if path.is_file() else args.classes.split(",")
        classes = [w.strip() for w in words if w.strip()]
    summary = index_shards(args.pattern, classes)
    print(
        f"indexed {summary['shards']} shards ({summary['samples']} samples, "
        f"{summary['classes']} classes) in {', '.join(summary['index'])}; train on them with: "
        f"data.name=webdataset 'data.root={args.pattern}'"
    )
    return 0


def shard(args) -> int:
    from mimar.data.shard_writer import write_shards

    summary = write_shards(
        args.folder,
        args.pattern,
        shard_size=args.shard_size,
        seed=args.seed,
        on_bad_image=args.on_bad_image,
        resume=args.resume,
    )
    if summary["skipped"]:
        n, first = len(summary["skipped"]), summary["skipped"][0]
        print(f"left out {n} unreadable image(s), e.g. {first}", file=sys.stderr)
    print(
        f"wrote {summary['shards']} shards ({summary['images']} images, "
        f"{summary['classes']} classes) in {summary['seconds']:.1f} s; train on them with: "
        f"data.name=webdataset 'data.root={summary['root']}'"
    )
    return 0
