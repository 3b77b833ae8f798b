"""Position information: fixed 2-D sin-cos tables (MAE) and relative position bias (BEiT)."""

from __future__ import annotations

import torch
from torch import nn


def sincos_pos_embed_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000^(k / (dim/2))``: ``(n, dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double().reshape(-1, 1) * omega  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed_2d(dim: int, grid: int | tuple[int, int]) -> torch.Tensor:
    """MAE's 2-D sin-cos table, ``(h*w, dim)`` in row-major token order.

    The first half of the channels encodes the column (w) and the second half the row, as
    MAE's ``meshgrid(grid_w, grid_h)`` does (docs/METHODS.md §1.1), so checkpoints stay compatible.
    """
    h, w = (grid, grid) if isinstance(grid, int) else grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w)
    emb_w = sincos_pos_embed_1d(dim // 2, cols.flatten())
    emb_h = sincos_pos_embed_1d(dim // 2, rows.flatten())
    return torch.cat([emb_w, emb_h], dim=1)  # (h*w, dim)


def relative_position_index(grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """BEiT's index into a relative-position table of ``(2g-1)^2 + 3`` rows: ``(T, T)`` long,
    T = P + g*g, laid out exactly as timm's ``beit.gen_relative_position_index`` so tables are
    exchangeable with timm's ``Beit``.

    Patch i (row r_i, col c_i) attending to patch j reads row
    ``(r_i - r_j + g - 1) * (2g - 1) + (c_i - c_j + g - 1)``; the last three rows are
    class -> patch, patch -> class and class -> class (``num_prefix_tokens`` 0 or 1).
    """
    if num_prefix_tokens not in (0, 1):
        raise ValueError(
            f"relative position bias supports 0 or 1 class token, not {num_prefix_tokens}"
        )
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (g*g,) row-major
    d_row = rows[:, None] - rows[None, :] + grid - 1  # (g*g, g*g) in [0, 2g-2]
    d_col = cols[:, None] - cols[None, :] + grid - 1
    patches = d_row * (2 * grid - 1) + d_col
    if not num_prefix_tokens:
        return patches
    size = (2 * grid - 1) ** 2 + 3
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = patches
    index[0, :] = size - 3  # class token attends to a patch
    index[:, 0] = size - 2  # a patch attends to the class token
    index[0, 0] = size - 1
    return index


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias, one value per head and relative offset.

    ``relative_position_bias_table`` ``((2g-1)^2 + 3, heads)`` starts at zero (SimMIM,
    docs/METHODS.md §10.7); timm's names and layout (``timm.models.beit.RelativePositionBias``).
    ``forward(ids)`` gives the additive attention bias ``(heads, T, T)`` for the full
    row-major sequence, or ``(B, heads, T, T)`` for a sequence whose patch tokens are the
    patch ids ``ids (B, n)`` (dropped or re-ordered tokens keep their own offsets).
    """

    def __init__(self, grid: int, num_heads: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * grid - 1) ** 2 + 3, num_heads)
        )
        index = relative_position_index(grid, num_prefix_tokens)
        self.register_buffer("relative_position_index", index, persistent=False)  # as timm

    def forward(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        index = self.relative_position_index  # (T, T)
        if ids is not None:
            P, B = self.num_prefix_tokens, ids.shape[0]
            prefix = torch.arange(P, device=ids.device).expand(B, P)
            seq = torch.cat([prefix, ids + P], dim=1)  # (B, T): rows of the full index
            index = index[seq[:, :, None], seq[:, None, :]]  # (B, T, T)
        return self.relative_position_bias_table[index].movedim(-1, -3)  # (..., heads, T, T)
