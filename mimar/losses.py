"""Pure loss functions. Each says exactly what it averages over (a test pins each one)."""

from __future__ import annotations

import torch


def masked_l1(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss (METHODS.md §2.4): mean |pred - target| over hidden pixel-channels.

    ``sum(|pred - target| * m) / (sum(m) + 1e-5) / C`` where ``m`` is the ``(B, 1, H, W)``
    pixel mask (1 = hidden) and ``C`` the channel count: ``sum(m)`` counts hidden pixel
    positions once, so dividing by ``C`` averages over every hidden pixel-channel. Visible
    pixels are predicted but not penalised.
    """
    C = pred.shape[1]
    l1 = (pred.float() - target.float()).abs()  # (B, C, H, W)
    return (l1 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / C
