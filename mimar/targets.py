"""What a method predicts: patchified (optionally per-patch normalised) pixels."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, p*p*C)`` with (row, col, channel) order inside a patch."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid."""
    B, N, _ = patches.shape
    g, p = int(N**0.5), patch_size
    x = patches.reshape(B, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, g * p, g * p)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of targets (MAE/AIM/iTPN): unbiased variance, eps 1e-6."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def upsample_mask(mask: torch.Tensor, grid: int, patch_size: int) -> torch.Tensor:
    """``(B, N)`` patch mask -> ``(B, 1, H, W)`` float pixel mask (1 = hidden)."""
    m = mask.reshape(-1, grid, grid).float()
    m = m.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return m.unsqueeze(1)
