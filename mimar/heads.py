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


class MLPBlock(nn.Module):
    """One per-token block of AIM's pretraining head: ``h += MLP(LN(h))``, MLP without biases.

    ``residual_norm`` reproduces the released l3m config, which builds the head from
    transformer blocks with an identity in the attention slot, so each block also adds its
    normalised input: ``h += LN_a(h)`` first (METHODS.md §5.3; the paper's text omits it).
    """

    def __init__(self, width: int, mlp_ratio: float, residual_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps) if residual_norm else None
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, width, bias=False)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm1 is not None:
            h = h + self.norm1(h)
        return h + self.mlp(self.norm2(h))


class AIMHead(nn.Module):
    """AIM's heavy MLP head (METHODS.md §5.3): every token is decoded on its own.

    ``Linear(D -> W) + sincos positions -> depth x MLPBlock(W) -> LN -> Linear(W -> T)``.
    All linears are xavier-uniform with zero biases (§10: the official scaled init of the last
    layer is overwritten by the generic one).
    """

    def __init__(
        self,
        embed_dim: int,
        width: int,
        depth: int,
        mlp_ratio: float,
        out_dim: int,
        pos_embed: torch.Tensor,
        residual_norm: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, width)
        self.register_buffer("pos_embed", pos_embed, persistent=False)  # (N, W), row-major
        self.blocks = nn.ModuleList(
            MLPBlock(width, mlp_ratio, residual_norm, eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=eps)
        self.pred = nn.Linear(width, out_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, D)`` in sequence order; ``order (N,)`` their row-major patch ids."""
        h = self.proj(tokens) + self.pos_embed[order].to(tokens.dtype)  # (B, N, W)
        for block in self.blocks:
            h = block(h)
        return self.pred(self.norm(h))  # (B, N, T)
