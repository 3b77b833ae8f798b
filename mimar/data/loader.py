"""StepLoader: the training batch of global step ``t`` as a pure function of (seed, t).

There is no iterator state to save: resuming at step t, or running on any number of ranks,
sees exactly the batches an uninterrupted single-process run sees. Each epoch is a fresh
permutation of the whole set (drop last); each step's augmentation is drawn for the whole
global batch, and every rank keeps its contiguous slice of rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from mimar.data.augment import BatchAugment, CropParams, eval_transform
from mimar.data.config import DataConfig
from mimar.data.image_set import ImageSet
from mimar.errors import DataError

_AUGMENT_STREAM = 1  # seeds (seed, step, 1): crop boxes and flips
_METHOD_STREAM = 2  # seeds (seed, step, 2): handed to the method for masks / corruption
_SUPERVISED_STREAM = 3  # seeds (seed, step, 3): fine-tuning's RandAugment, erasing, Mixup
_NETWORK_STREAM = 4  # seeds (seed, step, 4): the network's own draws (drop path)
STREAMS = {"method": _METHOD_STREAM, "network": _NETWORK_STREAM}


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions.

    Python's ``hash`` is not guaranteed stable and seeding with ``seed + step`` would make
    neighbouring runs share streams, so we hash the tuple.
    """
    digest = hashlib.blake2b(repr(tuple(int(v) for v in values)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def check_split(batch_size: int, rank: int, world_size: int) -> None:
    """A global batch that ``world_size`` ranks can split evenly, and a valid ``rank``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank} world={world_size}")
    if batch_size % world_size:
        raise DataError(
            f"data.batch_size={batch_size} (global) must be divisible by the world size "
            f"{world_size}"
        )


class StepLoader:
    """This rank's augmented rows of the global batch for any step.

    Args:
        images: the training split, kept on the CPU as uint8.
        augment: the batched augmentation.
        batch_size: global batch size, summed over ranks.
        seed: run seed; with the step it fixes order, augmentation and method draws.
        rank, world_size: this process's position among the data-parallel ranks.
    """

    def __init__(
        self,
        images: ImageSet,
        augment: BatchAugment,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        check_split(batch_size, rank, world_size)
        if len(images) < batch_size:
            raise DataError(
                f"{images.source or 'the dataset'} has {len(images)} images, fewer than "
                f"data.batch_size={batch_size}; lower the batch size or add images"
            )
        self.images, self.augment = images, augment
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(images) // batch_size  # drop last
        per_rank = batch_size // world_size
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's global rows
        self._order_epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices of the whole global batch of ``step``: int64 ``(batch_size,)``."""
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:  # a cache only: the order is a function of the epoch
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._order = torch.randperm(len(self.images), generator=gen)  # (N,)
            self._order_epoch = epoch
        return self._order[within * self.batch_size : (within + 1) * self.batch_size]

    def batch(self, step: int, device: torch.device | str | None = None) -> torch.Tensor:
        """This rank's float32 ``(batch_size / world_size, C, S, S)`` batch for ``step``.

        With ``device`` the uint8 rows move there before augmenting (4x less to copy than
        float, and the crops run on the accelerator); the draws stay on the CPU, so the
        chosen boxes do not depend on the device.
        """
        rows = self.indices(step)[self.rows]
        params = self.crop_params(step)  # global batch
        images = self.images.images[rows]  # (B / W, C, H, W) uint8
        if device is not None:
            images = images.to(device, non_blocking=True)
        return self.augment.apply(images, params.select(self.rows))

    def crop_params(self, step: int) -> CropParams:
        """Crop boxes and flips of the whole global batch of ``step``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _AUGMENT_STREAM))
        src_hw = tuple(self.images.images.shape[-2:])
        return self.augment.sample_params(self.batch_size, src_hw, gen)

    def inputs(self, step: int, device: torch.device | str | None = None) -> dict:
        """What the engine feeds the model at ``step``: ``{"images": batch(step)}``."""
        return {"images": self.batch(step, device)}

    def generator_for(self, step: int, stream: str = "method") -> torch.Generator:
        """A CPU generator for the random draws of ``step``: ``"method"`` for the method's
        (masks, orders), ``"network"`` for the network's own (drop path)."""
        return torch.Generator().manual_seed(derive_seed(self.seed, step, STREAMS[stream]))

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached at ``step``: the x-axis that compares batch sizes."""
        return step / self.steps_per_epoch


def build_step_loader(
    cfg: DataConfig, images: ImageSet, *, seed: int, rank: int = 0, world_size: int = 1
) -> StepLoader:
    """The training loader for ``images`` with ``cfg``'s crop, flip and batch size."""
    augment = BatchAugment(cfg.img_size, cfg.scale, cfg.ratio, cfg.hflip, images.mean, images.std)
    return StepLoader(
        images, augment, batch_size=cfg.batch_size, seed=seed, rank=rank, world_size=world_size
    )


def iterate_eval_batches(
    images: ImageSet, img_size: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Sequential ``(float images, labels or None)`` batches of the eval view; keeps the tail."""
    for start in range(0, len(images), batch_size):
        chunk = images.images[start : start + batch_size]
        labels = None if images.labels is None else images.labels[start : start + batch_size]
        yield eval_transform(chunk, img_size, images.mean, images.std), labels
