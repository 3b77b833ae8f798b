"""Datasets held in memory as uint8, batched augmentation, and the stateless step loader.

``load_images(cfg, split)`` gives an ``ImageSet``; ``build_step_loader`` turns the train split
into ``loader.batch(step)``; ``build_train_loader`` picks it or, for WebDataset shards, the
streaming ``ShardLoader``; ``iterate_eval_batches`` walks a split with the eval transform.
"""

from mimar.data.augment import BatchAugment, CropParams, eval_transform
from mimar.data.config import DataConfig
from mimar.data.image_set import ImageSet
from mimar.data.loader import StepLoader, build_step_loader, iterate_eval_batches
from mimar.data.shard_loader import ShardLoader
from mimar.data.sources import build_train_loader, load_images, normalization_stats

__all__ = [
    "BatchAugment",
    "CropParams",
    "DataConfig",
    "ImageSet",
    "ShardLoader",
    "StepLoader",
    "build_step_loader",
    "build_train_loader",
    "eval_transform",
    "iterate_eval_batches",
    "load_images",
    "normalization_stats",
]
