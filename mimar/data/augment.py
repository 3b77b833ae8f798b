"""Batched augmentation: SimMIM's RandomResizedCrop + horizontal flip, and the eval transform.

SimMIM (Xie et al., 2022, arXiv:2111.09886, Sec. 4.1) pretrains with random resized crops
(scale [0.67, 1], ratio [3/4, 4/3]) and random horizontal flips. We draw the crop boxes with
torchvision's ``RandomResizedCrop.get_params`` rules, but for a whole batch at once: every
image gets the same fixed number of candidate boxes and keeps the first valid one, so the
number of random draws never depends on the data and a generator state fixes the batch
exactly (the step loader relies on this for exact resume and multi-rank equality).

Deviations from torchvision's ``resized_crop``: crops are resampled with one bilinear
``grid_sample`` over the full image, which (1) does not antialias when a crop is shrunk by more
than 2x, and (2) when enlarging, reads the real pixels just outside the box for the outermost
output ring where torchvision repeats the box's edge pixels. Elsewhere the two agree to float
precision (tested). For SimMIM-style crops of images stored near the output size this barely
matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_TRIES = 10  # candidate boxes per image, as in torchvision's RandomResizedCrop.get_params


@dataclass(frozen=True)
class CropParams:
    """Crop boxes in source pixels and flip flags; row i belongs to sample i of the batch."""

    top: torch.Tensor  # (B,) int64
    left: torch.Tensor  # (B,) int64
    height: torch.Tensor  # (B,) int64
    width: torch.Tensor  # (B,) int64
    flip: torch.Tensor  # (B,) bool
    src_hw: tuple[int, int]  # source image size the boxes were drawn for

    def __len__(self) -> int:
        return len(self.top)

    def select(self, rows: slice | int | torch.Tensor) -> CropParams:
        """The params of some rows; an int keeps the batch dim (a batch of one)."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        return CropParams(
            top=self.top[rows],
            left=self.left[rows],
            height=self.height[rows],
            width=self.width[rows],
            flip=self.flip[rows],
            src_hw=self.src_hw,
        )


class BatchAugment:
    """Random resized crop to ``img_size``, horizontal flip, normalisation; all batched.

    Args:
        img_size: output side in pixels.
        scale: range of the crop area as a fraction of the source area.
        ratio: range of the crop aspect ratio (width / height), sampled log-uniformly.
        hflip: probability of flipping each sample horizontally.
        mean, std: per-channel statistics in [0, 1] pixel units.
    """

    def __init__(
        self,
        img_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.img_size = img_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = hflip
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> normalised float32 ``(B, C, img_size, img_size)``."""
        params = self.sample_params(len(images), tuple(images.shape[-2:]), generator)
        return self.apply(images, params)

    def sample_params(
        self, batch_size: int, src_hw: tuple[int, int], generator: torch.Generator
    ) -> CropParams:
        """Draw boxes and flips for a batch; always the same number of draws per call."""
        height, width = src_hw
        draw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        area = height * width * _uniform(*self.scale, (batch_size, _TRIES), draw)
        aspect = torch.exp(_uniform(log_lo, log_hi, (batch_size, _TRIES), draw))
        w = torch.sqrt(area * aspect).round()  # (B, T); round half to even, like Python's
        h = torch.sqrt(area / aspect).round()
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        tries = torch.arange(_TRIES, device=valid.device)
        first = torch.where(valid, tries, _TRIES).amin(1)  # (B,) first valid try, or T
        found = first < _TRIES
        pick = first.clamp(max=_TRIES - 1).unsqueeze(1)
        w, h = w.gather(1, pick).squeeze(1), h.gather(1, pick).squeeze(1)  # (B,)
        fallback_h, fallback_w = self._fallback_box(height, width)
        h = torch.where(found, h, float(fallback_h))
        w = torch.where(found, w, float(fallback_w))
        offsets = torch.rand((2, batch_size), **draw)  # uniform integer offset, like randint
        top = torch.where(found, (offsets[0] * (height - h + 1)).floor(), (height - h) // 2)
        left = torch.where(found, (offsets[1] * (width - w + 1)).floor(), (width - w) // 2)
        flip = torch.rand(batch_size, **draw) < self.hflip
        return CropParams(
            top=top.long(),
            left=left.long(),
            height=h.long(),
            width=w.long(),
            flip=flip,
            src_hw=(height, width),
        )

    def apply(
        self, images: torch.Tensor, params: CropParams, normalise: bool = True
    ) -> torch.Tensor:
        """Crop, resize, flip and normalise uint8 ``(B, C, H, W)`` with the given params
        (``normalise=False``: float pixels in [0, 1], for fine-tuning's pixel ops)."""
        batch, chans, height, width = images.shape
        if (height, width) != tuple(params.src_hw) or batch != len(params):
            raise ValueError(
                f"params drawn for {len(params)} images of {params.src_hw}, "
                f"got images of shape {tuple(images.shape)}"
            )
        x = images.float() / 255  # (B, C, H, W)
        box = [t.to(images.device, torch.float32) for t in (params.top, params.left)]
        size = [t.to(images.device, torch.float32) for t in (params.height, params.width)]
        # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1]; with
        # align_corners=False, -1 and 1 are the outer pixel edges, so a box [left, left + w]
        # becomes scale w / W and offset (2 left + w) / W - 1.
        theta = torch.zeros(batch, 2, 3, device=images.device)
        theta[:, 0, 0] = size[1] / width
        theta[:, 0, 2] = (2 * box[1] + size[1]) / width - 1
        theta[:, 1, 1] = size[0] / height
        theta[:, 1, 2] = (2 * box[0] + size[0]) / height - 1
        out_shape = [batch, chans, self.img_size, self.img_size]
        grid = F.affine_grid(theta, out_shape, align_corners=False)  # (B, S, S, 2)
        # border padding = torchvision's edge clamping when upsampling near the image border
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        flip = params.flip.to(images.device).view(batch, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)  # (B, C, S, S)
        return normalize(x, self.mean, self.std) if normalise else x

    def _fallback_box(self, height: int, width: int) -> tuple[int, int]:
        """torchvision's fallback: the whole image, clamped to the allowed aspect range."""
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            return round(width / self.ratio[0]), width
        if in_ratio > self.ratio[1]:
            return height, round(height * self.ratio[1])
        return height, width


def eval_transform(
    images: torch.Tensor, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Deterministic eval view: resize the shorter side to ``img_size``, center crop, normalise.

    Matches torchvision's ``Resize(img_size)`` (bilinear, antialias) + ``CenterCrop`` on a
    batch of uint8 ``(B, C, H, W)``; returns float32 ``(B, C, img_size, img_size)``.
    """
    x = images.float() / 255
    height, width = x.shape[-2:]
    if min(height, width) != img_size:
        if height <= width:
            new_hw = (img_size, int(img_size * width / height))
        else:
            new_hw = (int(img_size * height / width), img_size)
        x = F.interpolate(x, size=new_hw, mode="bilinear", align_corners=False, antialias=True)
    top = round((x.shape[-2] - img_size) / 2)
    left = round((x.shape[-1] - img_size) / 2)
    x = x[..., top : top + img_size, left : left + img_size]
    return normalize(x, mean, std)


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of float ``(B, C, H, W)`` in [0, 1]."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(f"mean/std need {x.shape[1]} values, got mean={mean} std={std}")
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _uniform(lo: float, hi: float, shape: tuple[int, ...], draw: dict) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, **draw)
