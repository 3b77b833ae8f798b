"""DataConfig: which images to load and how the training batches are augmented."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from mimar.errors import check_range

DatasetName = Literal["fashion_mnist", "image_folder", "synthetic", "webdataset"]
BadImagePolicy = Literal["error", "skip"]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Dataset source plus the SimMIM-style augmentation (random resized crop + flip).

    ``root`` means: for fashion_mnist the folder holding the idx files (plain, ``.gz``, or
    torchvision's ``FashionMNIST/raw`` layout); for image_folder the folder whose ``train`` /
    ``val`` / ``test`` sub-folders are the splits (or the folder itself for train); for
    webdataset the train shards, e.g. ``/data/in1k/train-{000000..001023}.tar`` (the test split:
    the same names with ``val`` or ``test`` for ``train``, see ``mimar/data/shards.py``).
    """

    name: DatasetName = "fashion_mnist"
    root: str = "/usr/share/datasets/fashion-mnist"
    batch_size: int = 64  # global batch per optimizer micro-step, summed over all ranks
    img_size: int = 32  # output side in pixels
    in_chans: int = 1  # 1 or 3; sources are converted (gray replicated, RGB to L)
    scale: tuple[float, float] = (0.67, 1.0)  # RandomResizedCrop area scale, SimMIM Sec. 4.1
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # torchvision default aspect range
    hflip: float = 0.5
    mean: tuple[float, ...] | None = None  # None -> the dataset's own statistics
    std: tuple[float, ...] | None = None
    on_bad_image: BadImagePolicy = "error"
    download: bool = False  # fashion_mnist only: let torchvision download missing files
    synthetic_size: int = 512
    synthetic_classes: int = 4
    num_workers: int = 0  # image_folder, webdataset: DataLoader workers for decoding
    max_images: int = 0  # 0 = all; else a fixed subset: the first ones (folders: evenly spaced)

    def __post_init__(self) -> None:
        # Recipes come from YAML, where pairs arrive as lists; store tuples so the config
        # stays hashable and compares equal to one built in Python.
        for field in ("scale", "ratio", "mean", "std"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
        _check_choice("name", self.name, DatasetName)
        _check_choice("on_bad_image", self.on_bad_image, BadImagePolicy)
        for field in ("batch_size", "img_size", "synthetic_size", "synthetic_classes"):
            check_range(f"data.{field}", getattr(self, field), getattr(self, field) >= 1, ">= 1")
        for field in ("num_workers", "max_images"):
            check_range(f"data.{field}", getattr(self, field), getattr(self, field) >= 0, ">= 0")
        check_range("data.in_chans", self.in_chans, self.in_chans in (1, 3), "1 or 3")
        self._check_crop()
        self._check_stats()

    def _check_crop(self) -> None:
        lo, hi = _pair("scale", self.scale)
        ok = 0 < lo <= hi <= 1
        check_range("data.scale", self.scale, ok, "a pair 0 < lo <= hi <= 1")
        lo, hi = _pair("ratio", self.ratio)
        ok = 0 < lo <= hi and math.isfinite(hi)  # inf is no ratio
        check_range("data.ratio", self.ratio, ok, "a pair 0 < lo <= hi")
        check_range("data.hflip", self.hflip, 0 <= self.hflip <= 1, "a probability in [0, 1]")

    def _check_stats(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("data.mean and data.std must be given together (or both None)")
        if self.mean is None or self.std is None:
            return
        if len(self.mean) not in (1, 3) or len(self.mean) != len(self.std):
            raise ValueError(
                f"data.mean and data.std need 1 or 3 values each and the same length, "
                f"got mean={self.mean} std={self.std}"
            )
        check_range("data.std", self.std, all(s > 0 for s in self.std), "values > 0")


def _check_choice(field: str, value: object, choices: object) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"data.{field} must be one of {allowed}, got {value!r}")


def _pair(field: str, value: tuple[float, ...]) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"data.{field} must be a (lo, hi) pair, got {value}")
    return float(value[0]), float(value[1])
