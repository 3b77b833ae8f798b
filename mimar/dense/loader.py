"""The dense step loader: this rank's images with their label maps or boxes, for any step.

Order and flips are pure functions of (seed, step), as for pretraining and fine-tuning
(``mimar.data.loader.StepLoader`` gives the order): exact resume, and a 2-process run sees the
rows a 1-process run sees. The only augmentation is a random horizontal flip (of image, label
map and boxes alike); the papers' scale jitter / random crops are left to a GPU budget.
"""

from __future__ import annotations

import torch

from mimar.data import ImageSet
from mimar.data.loader import _AUGMENT_STREAM, StepLoader, derive_seed
from mimar.dense.coco import DenseSet


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float, ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def padded_boxes(data: DenseSet, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``(b, M, 4)`` and labels ``(b, M)`` of ``rows``, padded with label 0 to the
    largest count M among them."""
    count = max([len(data.boxes[int(i)]) for i in rows] + [1])
    boxes = torch.zeros(len(rows), count, 4)
    labels = torch.zeros(len(rows), count, dtype=torch.long)
    for j, i in enumerate(rows.tolist()):
        n = len(data.boxes[i])
        boxes[j, :n], labels[j, :n] = data.boxes[i], data.classes[i]
    return boxes, labels


class DenseStepLoader:
    """``inputs(step) -> {"images", "semantic"}`` (segment) or ``{"images", "boxes",
    "box_labels"}`` (detect) for this rank's rows of the global batch."""

    def __init__(
        self,
        data: DenseSet,
        task: str,
        *,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        hflip: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        frame = ImageSet(data.images, None, None, mean, std, source=data.source)
        self.steps = StepLoader(
            frame, None, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size
        )
        self.images = frame  # what the engine logs (its source)
        self.data, self.task, self.mean, self.std, self.hflip = data, task, mean, std, hflip
        self.seed, self.batch_size = seed, batch_size
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = self.steps.steps_per_epoch

    def flips(self, step: int) -> torch.Tensor:
        """Whether each row of the global batch of ``step`` is flipped: bool ``(B,)``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _AUGMENT_STREAM))
        flip = torch.rand(self.batch_size, generator=gen) < 0.5
        return flip & self.hflip

    def inputs(self, step: int) -> dict:
        rows = self.steps.indices(step)[self.steps.rows]  # (b,) dataset rows of this rank
        flip = self.flips(step)[self.steps.rows]  # (b,)
        images = self.data.images[rows]  # (b, C, H, W) uint8
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        out = {"images": normalise(images, self.mean, self.std)}
        if self.task == "segment":
            semantic = self.data.semantic[rows].long()  # (b, H, W)
            out["semantic"] = torch.where(flip.view(-1, 1, 1), semantic.flip(-1), semantic)
            return out
        boxes, labels = padded_boxes(self.data, rows)  # (b, M, 4), (b, M)
        W = images.shape[-1]
        mirrored = torch.stack(
            [W - boxes[..., 2], boxes[..., 1], W - boxes[..., 0], boxes[..., 3]], -1
        )
        out["boxes"] = torch.where(flip.view(-1, 1, 1), mirrored, boxes)
        out["box_labels"] = labels
        return out

    def generator_for(self, step: int, stream: str = "method") -> torch.Generator:
        return self.steps.generator_for(step, stream)

    def epoch_of(self, step: int) -> float:
        return self.steps.epoch_of(step)
