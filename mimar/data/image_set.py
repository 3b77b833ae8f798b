"""ImageSet: a whole split held in memory as one uint8 tensor, plus its labels and statistics.

Keeping images as uint8 (4x smaller than float) and augmenting whole batches on the fly is
what lets the step loader be a pure function of (seed, step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

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


UNKNOWN_LABEL = -1  # a test image of a class training lacks: no classifier ever predicts it
UNKNOWN_CLASSES = ("error", "wrong")  # mimar eval --unknown-classes


def align_classes(
    train: ImageSet, test: ImageSet, where: str, unknown_classes: str = "error"
) -> tuple[ImageSet, dict[str, int]]:
    """``test`` labelled by the train split's class list, and the images per test class that
    training lacks.

    ``unknown_classes="error"``: any difference of the two lists is an error
    (:func:`check_same_classes`). ``"wrong"``: the test labels are mapped by class name onto the
    train split's indices and an image of a class training lacks gets :data:`UNKNOWN_LABEL`,
    which no prediction equals: it counts as wrong in every top-1, whose denominator stays
    every test image. Either class list None (names unknown): nothing to map.
    """
    if unknown_classes not in UNKNOWN_CLASSES:
        raise DataError(
            f"unknown_classes must be one of {UNKNOWN_CLASSES}, got {unknown_classes!r}"
        )
    if unknown_classes == "error" or train.classes is None or test.classes is None:
        check_same_classes(train.classes, test.classes, where)
        return test, {}
    if list(train.classes) == list(test.classes) or test.labels is None:
        return test, {}
    index = {name: i for i, name in enumerate(train.classes)}
    lookup = torch.tensor([index.get(name, UNKNOWN_LABEL) for name in test.classes])
    labels = lookup[test.labels]  # (N,) train indices, UNKNOWN_LABEL for the unknown
    counts = {
        name: int((test.labels == k).sum())
        for k, name in enumerate(test.classes)
        if name not in index
    }
    counts = {name: n for name, n in counts.items() if n}
    return replace(test, labels=labels, classes=list(train.classes)), counts


def unknown_note(counts: dict[str, int]) -> str:
    """The table's note of :func:`align_classes`'s count ("" when there is none)."""
    if not counts:
        return ""
    shown = ", ".join(f"{name} {n}" for name, n in list(counts.items())[:5])
    more = " ..." if len(counts) > 5 else ""
    classes = f"{len(counts)} class{'es' if len(counts) > 1 else ''}"
    return (
        f"{sum(counts.values())} test images of {classes} unknown to training scored wrong "
        f"({shown}{more})"
    )


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
