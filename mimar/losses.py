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


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """AIM's loss (METHODS.md §5.4): squared error averaged over the T values of a token,
    then over the valid tokens of the whole batch.

    ``sum_{b,i} valid[b,i] * mean_t (pred - target)^2 / sum(valid)`` for ``(B, N, T)``
    predictions and targets and a bool ``(B, N)`` ``valid`` (True = counted).
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    w = valid.to(err.dtype)
    return (err * w).sum() / w.sum().clamp(min=1)
