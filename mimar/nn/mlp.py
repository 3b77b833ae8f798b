"""Token-wise MLPs: the transformer MLP and the residual per-token MLP block."""

from __future__ import annotations

import torch
from torch import nn

from mimar.nn.fused import linear
from mimar.nn.layers import DropPath, LayerScale


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))`` (timm names ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, self.fc1, gelu=True), self.fc2)  # fc2(GELU(fc1(x)))


class MLPBlock(nn.Module):
    """``x += DropPath(LayerScale(MLP(LN(x))))`` per token: the attention-free block of HiViT's
    stages 1-2 and of iTPN's pyramid neck ("num_heads = 0" in the official code); LayerScale
    only with ``init_values`` (iTPN-CLIP's stages 1-2)."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        init_values: float | None = None,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=True)
        self.ls = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.ls(self.mlp(self.norm(x))))
