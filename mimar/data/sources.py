"""load_images: the one place that maps ``DataConfig.name`` to a source."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from mimar.data.config import DataConfig
from mimar.data.fashion_mnist import load_fashion_mnist
from mimar.data.image_folder import load_image_folder
from mimar.data.image_set import ImageSet, match_stats
from mimar.data.synthetic import make_synthetic

_SOURCES = {
    "fashion_mnist": load_fashion_mnist,
    "image_folder": load_image_folder,
    "synthetic": make_synthetic,
}


def load_images(cfg: DataConfig, split: Literal["train", "test"]) -> ImageSet:
    """Load one split into memory, apply ``max_images`` and any configured mean/std.

    Args:
        cfg: data configuration; ``cfg.name`` picks the source.
        split: "train" or "test" (image folders read ``val/`` or ``test/`` for "test").
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
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
