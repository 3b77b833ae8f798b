"""Pure loss functions. Each says exactly what it averages over (a test pins each one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_l1(pred: torch.Tensor, target: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss (docs/METHODS.md §2.4): mean |pred - target| over hidden pixel-channels.

    ``sum(|pred - target| * m) / (sum(m) + 1e-5) / C`` where ``m`` is the ``(B, 1, H, W)``
    pixel mask (1 = hidden) and ``C`` the channel count: ``sum(m)`` counts hidden pixel
    positions once, so dividing by ``C`` averages over every hidden pixel-channel. Visible
    pixels are predicted but not penalised.
    """
    C = pred.shape[1]
    l1 = (pred.float() - target.float()).abs()  # (B, C, H, W)
    return (l1 * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / C


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """AIM's loss (docs/METHODS.md §5.4): squared error averaged over the T values of a token,
    then over the valid tokens of the whole batch.

    ``sum_{b,i} valid[b,i] * mean_t (pred - target)^2 / sum(valid)`` for ``(B, N, T)``
    predictions and targets and a bool ``(B, N)`` ``valid`` (True = counted).
    """
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    w = valid.to(err.dtype)
    return (err * w).sum() / w.sum().clamp(min=1)


def neg_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """EVA's loss (docs/METHODS.md §3.4): minus the cosine similarity of each row of ``pred`` with
    the same row of ``target``, averaged over the rows.

    ``-mean_i cos(pred_i, target_i)`` for ``(M, T)`` inputs (any leading shape works: every
    vector along the last dim counts once), computed in fp32. EVA passes the hidden tokens of
    the whole local batch, so each hidden token counts once and an image with more hidden
    tokens weighs more. Ranges over [-1, 1]; cosine makes the target's scale irrelevant.
    """
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """iTPN-CLIP's loss (docs/METHODS.md §4.6): smooth L1 averaged over every value of every token.

    ``mean over all B * N * T elements of (0.5 d^2 / beta if |d| < beta else |d| - beta / 2)``
    with ``d = pred - target`` (``nn.SmoothL1Loss()``'s default mean), computed in fp32. The
    official code passes all tokens, hidden and visible.
    """
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """D-iGPT's loss (docs/METHODS.md §6.6): ``2 - 2 cos`` per vector, averaged over the vectors.

    ``mean_i (2 - 2 cos(pred_i, target_i))`` over every vector along the last dim (for
    ``(B, T, D)`` inputs: all B * T tokens count equally), computed in fp32. Equals the squared
    distance of the L2-normalised vectors; ranges over [0, 4].
    """
    return 2 - 2 * F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()
