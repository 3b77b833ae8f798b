"""load_images and build_train_loader: the one place that maps ``DataConfig.name`` to a source."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from mimar.data.config import DataConfig
from mimar.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from mimar.data.image_folder import load_image_folder
from mimar.data.image_set import IMAGENET_MEAN, IMAGENET_STD, ImageSet, match_stats
from mimar.data.loader import StepLoader, build_step_loader
from mimar.data.shard_loader import ShardLoader, build_shard_loader
from mimar.data.shards import load_shards
from mimar.data.synthetic import make_synthetic
from mimar.errors import DataError

_SOURCES = {
    "fashion_mnist": load_fashion_mnist,
    "image_folder": load_image_folder,
    "synthetic": make_synthetic,
    "webdataset": load_shards,  # evaluation: a whole split in memory
}


def load_images(
    cfg: DataConfig, split: Literal["train", "test"], *, unknown_classes: str = "error"
) -> ImageSet:
    """Load one split into memory, apply ``max_images`` and any configured mean/std.

    Args:
        cfg: data configuration; ``cfg.name`` picks the source.
        split: "train" or "test" (image folders read ``val/`` or ``test/`` for "test").
        unknown_classes: an image folder's held-out class that the train split lacks: "error"
            (refused, naming it) or "wrong" (kept after the train classes, to be scored wrong
            by :func:`mimar.data.image_set.align_classes`). Other sources name their classes
            per split, and ``align_classes`` compares them.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.name == "image_folder":
        images = load_image_folder(cfg, split, unknown_classes)
    else:
        images = _SOURCES[cfg.name](cfg, split)
    if cfg.max_images and len(images) > cfg.max_images:
        keep = cfg.max_images
        # clone() so the truncated set does not pin the full split's storage.
        images = replace(
            images,
            images=images.images[:keep].clone(),
            labels=None if images.labels is None else images.labels[:keep].clone(),
            source=f"{images.source}, first {keep} kept (data.max_images)",
        )
    if cfg.mean is not None and cfg.std is not None:
        images = replace(
            images,
            mean=match_stats(cfg.mean, cfg.in_chans),
            std=match_stats(cfg.std, cfg.in_chans),
        )
    return images


def normalization_stats(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) that :func:`load_images` normalises ``cfg``'s images with,
    without reading any image (a frozen teacher needs them to undo the normalisation)."""
    if cfg.mean is not None and cfg.std is not None:
        mean, std = cfg.mean, cfg.std
    elif cfg.name == "fashion_mnist":
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    else:  # image folders and synthetic images use the ImageNet statistics
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return match_stats(mean, cfg.in_chans), match_stats(std, cfg.in_chans)


def build_train_loader(
    cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False
) -> StepLoader | ShardLoader:
    """The pretraining loader of ``cfg``: WebDataset shards stream from disk (``pin_memory``:
    their batches come back pinned, for CUDA); every other source is loaded into memory."""
    if cfg.name == "webdataset":
        mean, std = normalization_stats(cfg)
        return build_shard_loader(
            cfg, mean, std, seed=seed, rank=rank, world_size=world_size, pin_memory=pin_memory
        )
    images = load_images(cfg, "train")
    return build_step_loader(cfg, images, seed=seed, rank=rank, world_size=world_size)
