"""A tiny deterministic dataset whose classes are visibly different, for tests and smoke runs.

Class k draws oriented stripes at angle pi * k / K and a Gaussian blob placed on a circle at
angle 2 pi * k / K; each image jitters angle, phase and blob position and adds noise. The
class means therefore differ, so even a nearest-centroid classifier on raw pixels separates
the classes, and a pretrained encoder has real structure to find. Train and test use
different seeds but the same class recipe.
"""

from __future__ import annotations

import math

import torch

from mimar.data.config import DataConfig
from mimar.data.image_set import IMAGENET_MEAN, IMAGENET_STD, ImageSet, match_stats

_SPLIT_SEED = {"train": 0, "test": 1}
_STRIPE_CYCLES = 2.0  # stripe periods across the image
_BLOB_RADIUS = 0.5  # distance of the blob centre from the image centre, in [-1, 1] units
_BLOB_SIGMA = 0.3
_NOISE = 0.08


def make_synthetic(cfg: DataConfig, split: str) -> ImageSet:
    """``cfg.synthetic_size`` images of ``cfg.img_size`` px, ``cfg.synthetic_classes`` classes."""
    gen = torch.Generator().manual_seed(_SPLIT_SEED[split])
    n, k, size = cfg.synthetic_size, cfg.synthetic_classes, cfg.img_size
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]  # balanced classes
    coords = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (H, W) each

    def jitter(scale: float) -> torch.Tensor:
        return scale * torch.randn(n, 1, 1, generator=gen)  # (N, 1, 1)

    angle = (math.pi * labels / k).view(n, 1, 1) + jitter(0.1)
    along = x * torch.cos(angle) + y * torch.sin(angle)  # (N, H, W)
    stripes = 0.5 + 0.5 * torch.cos(2 * math.pi * _STRIPE_CYCLES * along + jitter(0.3))
    place = (2 * math.pi * labels / k).view(n, 1, 1)
    cx = _BLOB_RADIUS * torch.cos(place) + jitter(0.1)
    cy = _BLOB_RADIUS * torch.sin(place) + jitter(0.1)
    blob = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * _BLOB_SIGMA**2))  # (N, H, W)
    gray = 0.4 * stripes + 0.6 * blob
    # Per-class colour tint, so RGB variants also carry class information in colour.
    chans = torch.arange(cfg.in_chans).view(1, -1, 1, 1)
    tint = 0.7 + 0.3 * torch.cos(place.unsqueeze(1) + 2 * math.pi * chans / 3)  # (N, C, 1, 1)
    pixels = gray.unsqueeze(1) * (tint if cfg.in_chans == 3 else 1.0)
    pixels = pixels + _NOISE * torch.randn(pixels.shape, generator=gen)  # (N, C, H, W)
    images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(
        images=images,
        labels=labels.long(),
        classes=[f"class_{i}" for i in range(k)],
        mean=match_stats(IMAGENET_MEAN, cfg.in_chans),
        std=match_stats(IMAGENET_STD, cfg.in_chans),
        source=f"synthetic {split} ({n} images, {k} classes, {size} px)",
    )
