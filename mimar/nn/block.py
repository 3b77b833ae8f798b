"""The pre-norm transformer block shared by ViT, HiViT's stage 3 and the decoders."""

from __future__ import annotations

import torch
from torch import nn

from mimar.nn.attention import Attention
from mimar.nn.layers import DropPath, LayerScale
from mimar.nn.mlp import Mlp


class Block(nn.Module):
    """``x += Attn(LN(x)); x += MLP(LN(x))`` with optional LayerScale and drop path.

    Weight names follow timm's ``Block``: ``norm1``, ``attn.qkv``, ``attn.proj``,
    ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``.

    Args:
        dim: token width D.
        num_heads: attention heads (D must be divisible by it).
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias of the fused qkv projection.
        proj_bias: biases of the attention output projection and of the MLP (AIM: none).
        init_values: LayerScale initial value; None or 0 = no LayerScale.
        drop_path: stochastic-depth rate of both residual branches.
        norm_eps: LayerNorm epsilon.
        rel_pos_bias: this block's own relative position bias module (BEiT per-block
            table, ``attn.rel_pos_bias.*``), or None.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        init_values: float | None = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        rel_pos_bias: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, rel_pos_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask, pos_ids)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
