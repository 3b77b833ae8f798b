"""Small layers: LayerScale."""

from __future__ import annotations

import torch
from torch import nn


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` (CaiT; timm name ``gamma``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
