"""ImageSet: a whole split held in memory as one uint8 tensor, plus its labels and statistics.

Keeping images as uint8 (4x smaller than float) and augmenting whole batches on the fly is
what lets the step loader be a pure function of (seed, step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mimar.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSet:
    """One split of a dataset.

    Attributes:
        images: uint8 ``(N, C, H, W)``, C already converted to the requested ``in_chans``.
        labels: int64 ``(N,)`` class indices, or None for unlabelled folders.
        classes: class names indexed by label, or None.
        mean, std: per-channel normalisation statistics (length C) in [0, 1] pixel units.
        skipped: number of unreadable images that were skipped.
        source: human description for logs.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    classes: list[str] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"ImageSet.images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise DataError(
                f"ImageSet.labels must have shape ({len(self.images)},), "
                f"got {tuple(self.labels.shape)}"
            )
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(
                f"ImageSet.mean/std need {channels} values, got mean={self.mean} std={self.std}"
            )

    def __len__(self) -> int:
        return len(self.images)


def replicate_gray(images: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Give uint8 ``(N, 1, H, W)`` gray images ``in_chans`` identical channels."""
    if images.shape[1] != 1:
        raise DataError(f"expected 1-channel images, got {images.shape[1]} channels")
    return images if in_chans == 1 else images.repeat(1, in_chans, 1, 1)


def match_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Fit per-channel statistics to ``in_chans``: replicate one value, or average three.

    Averaging RGB statistics for gray input is an approximation (the exact value depends on
    the luma weights and channel correlations), close enough for normalisation.
    """
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise DataError(f"cannot fit statistics {values} to in_chans={in_chans}")


def check_same_classes(train: list[str] | tuple[str, ...] | None, test, where: str) -> None:
    """Refuse a held-out split whose class list is not the train split's: its labels index
    another mapping, so every score against it would be silently wrong (``where``: the data,
    for the message). Either side None (names unknown) is not checked."""
    if train is None or test is None or list(train) == list(test):
        return
    unknown = [name for name in test if name not in set(train)]
    if unknown:
        shown = ", ".join(map(str, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
        problem = f"classes the train split lacks: {shown}"
    else:
        problem = "the same classes in another order"
    raise DataError(
        f"{where}: the test split's {len(test)} classes do not map like the train split's "
        f"{len(train)} ({problem}); every split must share the train split's class list"
    )
