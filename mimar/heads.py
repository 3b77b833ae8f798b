"""Heads and decoders that map encoder tokens to predictions."""

from __future__ import annotations

import torch
from torch import nn


class PixelShuffleHead(nn.Module):
    """SimMIM's one-layer linear decoder (METHODS.md §2.3).

    A 1x1 convolution maps every token of the ``(B, D, h, w)`` feature map to
    ``stride^2 * C`` values, and ``PixelShuffle(stride)`` lays them out as the
    ``stride x stride`` pixels the token covers: ``(B, C, h*stride, w*stride)``.
    Keeps PyTorch's default Conv2d init, as the official code does (§10.7).
    """

    def __init__(self, embed_dim: int, encoder_stride: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(embed_dim, encoder_stride**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(encoder_stride)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(feature_map))
