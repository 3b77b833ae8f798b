"""Fashion-MNIST read straight from its idx files (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747).

Reading the four idx files ourselves keeps the data layer free of torchvision's dataset
classes and works with the Debian package ``dataset-fashion-mnist``
(/usr/share/datasets/fashion-mnist). torchvision is used only for the opt-in download.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from mimar.data.config import DataConfig
from mimar.data.image_set import ImageSet, match_stats, replicate_gray
from mimar.errors import DataError, MissingFileError

FASHION_MNIST_MEAN = (0.2860,)  # training-set pixel statistics in [0, 1] units
FASHION_MNIST_STD = (0.3530,)
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # idx: 0x08 = unsigned byte data, 0x03 = three dimensions
_LABELS_MAGIC = 0x00000801


def load_fashion_mnist(cfg: DataConfig, split: str) -> ImageSet:
    """Load one split as uint8 ``(N, in_chans, 28, 28)`` with int64 labels 0..9."""
    root = Path(cfg.root)
    names = [f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte"]
    paths = [_find(root, name) for name in names]
    if None in paths and cfg.download:
        _download(root, split)
        paths = [_find(root, name) for name in names]
    image_path, label_path = paths
    if image_path is None or label_path is None:
        raise MissingFileError(
            f"Fashion-MNIST {split} files not found under {root}: expected {names[0]}[.gz] and "
            f"{names[1]}[.gz] in {root} or {root / 'FashionMNIST' / 'raw'}. Install them with "
            f"`apt-get install dataset-fashion-mnist` (as root; files land in "
            f"/usr/share/datasets/fashion-mnist), or set data.download=true to let torchvision "
            f"download them into {root}."
        )
    images = read_idx(image_path, _IMAGES_MAGIC)  # (N, 28, 28)
    labels = read_idx(label_path, _LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
        )
    return ImageSet(
        images=replicate_gray(images.unsqueeze(1), cfg.in_chans),
        labels=labels.long(),
        classes=list(CLASSES),
        mean=match_stats(FASHION_MNIST_MEAN, cfg.in_chans),
        std=match_stats(FASHION_MNIST_STD, cfg.in_chans),
        source=f"Fashion-MNIST {split} ({len(images)} images) from {image_path.parent}",
    )


def read_idx(path: Path, magic: int) -> torch.Tensor:
    """Read an unsigned-byte idx file (optionally gzipped) into a uint8 tensor.

    Layout: big-endian uint32 magic, one big-endian uint32 per dimension, then the bytes.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # what gzip raises for damaged files
        raise DataError(f"cannot read idx file {path}: {err}") from err
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise DataError(f"idx file {path} is too short ({len(data)} bytes) for its header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(f"idx file {path} has magic number {found:#010x}, expected {magic:#010x}")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DataError(
            f"idx file {path} has {len(data)} bytes, expected {expected} for dims {dims}"
        )
    pixels = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(pixels.copy())  # copy: frombuffer views are read-only


def _find(root: Path, name: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def _download(root: Path, split: str) -> None:
    from torchvision.datasets import FashionMNIST  # only needed for this opt-in path

    # torchvision keeps both the .gz and the unpacked files in root/FashionMNIST/raw.
    FashionMNIST(str(root), train=split == "train", download=True)
