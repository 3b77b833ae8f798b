"""The fine-tuning step loader: this rank's augmented images and soft targets of any step.

The pretraining ``StepLoader`` gives the order and the crop + flip (pure functions of
(seed, step)); ``mimar.data.supervised.SupervisedAugment`` adds RandAugment, jitter, erasing,
Mixup/CutMix and label smoothing from draws of a third stream of the same (seed, step). Mixup
pairs rows of the *global* batch, so a rank also crops the partner rows it mixes with (another
rank's images, cropped exactly as that rank crops them): a 2-process fine-tune equals a
1-process one.
"""

from __future__ import annotations

import torch

from mimar.data import DataConfig, ImageSet
from mimar.data.augment import BatchAugment
from mimar.data.loader import _SUPERVISED_STREAM, StepLoader, derive_seed
from mimar.data.supervised import SupervisedAugment, SupervisedAugmentConfig


class SupervisedStepLoader:
    """``inputs(step) -> {"images": (b, C, S, S) normalised, "targets": (b, K) soft}``."""

    def __init__(
        self,
        images: ImageSet,
        data: DataConfig,
        augment: SupervisedAugmentConfig,
        num_classes: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.labels is None:
            raise ValueError("fine-tuning needs labelled images")
        crop = BatchAugment(
            data.img_size, data.scale, data.ratio, data.hflip, images.mean, images.std
        )
        self.steps = StepLoader(
            images, crop, batch_size=data.batch_size, seed=seed, rank=rank, world_size=world_size
        )
        self.augment = SupervisedAugment(augment, num_classes, images.mean, images.std)
        self.images, self.seed = images, seed
        self.batch_size, self.rank, self.world_size = data.batch_size, rank, world_size
        self.steps_per_epoch = self.steps.steps_per_epoch

    def inputs(self, step: int, device: torch.device | str | None = None) -> dict:
        idx = self.steps.indices(step)  # (B,) dataset rows of the global batch
        params = self.steps.crop_params(step)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _SUPERVISED_STREAM))
        draws = self.augment.sample(self.batch_size, gen)
        own = torch.arange(self.batch_size)[self.steps.rows]  # this rank's global rows
        x = self._crop(idx[own], params.select(own), device)
        labels = self.images.labels[idx[own]]
        partners = self.augment.partner_rows(draws, self.steps.rows)
        px = py = None
        if partners is not None and self.world_size > 1:  # partners may be another rank's
            px = self._crop(idx[partners], params.select(partners), device)
            py = self.images.labels[idx[partners]]
        x, targets = self.augment.apply(x, labels, draws, self.steps.rows, px, py)
        return {"images": x, "targets": targets}

    def _crop(self, rows: torch.Tensor, params, device) -> torch.Tensor:
        images = self.images.images[rows]  # (b, C, H, W) uint8
        if device is not None:
            images = images.to(device, non_blocking=True)
        return self.steps.augment.apply(images, params, normalise=False)  # [0, 1] floats

    def generator_for(self, step: int, stream: str = "method") -> torch.Generator:
        return self.steps.generator_for(step, stream)

    def epoch_of(self, step: int) -> float:
        return self.steps.epoch_of(step)
