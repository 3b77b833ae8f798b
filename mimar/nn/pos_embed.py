"""Position embeddings: fixed 2-D sin-cos tables (MAE convention)."""

from __future__ import annotations

import torch


def sincos_pos_embed_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos * w_k), cos(pos * w_k)]`` with ``w_k = 1 / 10000^(k / (dim/2))``: ``(n, dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos.double().reshape(-1, 1) * omega  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_pos_embed_2d(dim: int, grid: int | tuple[int, int]) -> torch.Tensor:
    """MAE's 2-D sin-cos table, ``(h*w, dim)`` in row-major token order.

    The first half of the channels encodes the column (w) and the second half the row, as
    MAE's ``meshgrid(grid_w, grid_h)`` does (METHODS.md §1.1), so checkpoints stay compatible.
    """
    h, w = (grid, grid) if isinstance(grid, int) else grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w)
    emb_w = sincos_pos_embed_1d(dim // 2, cols.flatten())
    emb_h = sincos_pos_embed_1d(dim // 2, rows.flatten())
    return torch.cat([emb_w, emb_h], dim=1)  # (h*w, dim)
