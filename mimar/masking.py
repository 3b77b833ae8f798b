"""Corruptions: mask generators (and, in later issues, autoregressive orders).

Convention used everywhere in mimar: a mask is a bool tensor ``hidden`` of shape ``(B, N)``
over the model's patch grid in row-major order, True = hidden / to be predicted.
Every generator takes a ``torch.Generator`` so the engine can make draws a pure function of
(seed, step): that is what makes resume and multi-process runs exact.
"""

from __future__ import annotations

import math

import torch


class SimMIMMasking:
    """SimMIM's random mask of coarse square cells (METHODS.md §2.1).

    The image is cut into ``mask_patch_size`` cells; exactly ``ceil(cells * mask_ratio)`` of
    them are hidden, chosen uniformly without replacement, and each cell is upsampled to the
    ``mask_patch_size / model_patch_size`` model patches it covers.
    """

    def __init__(
        self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float
    ) -> None:
        if input_size % mask_patch_size:
            raise ValueError(
                f"image size {input_size} is not divisible by mask_patch_size {mask_patch_size}"
            )
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} is not a multiple of the model patch size "
                f"{model_patch_size}"
            )
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.rand_size = input_size // mask_patch_size  # cells per side: 7 for ViT-B @224
        self.scale = mask_patch_size // model_patch_size  # model patches per cell side: 2
        self.num_mask = math.ceil(self.rand_size**2 * mask_ratio)  # 30 of 49 for ViT-B @224
        self.grid = self.rand_size * self.scale

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r, s = self.rand_size, self.scale
        noise = torch.rand(batch_size, r * r, generator=generator)
        ranks = noise.argsort(dim=1).argsort(dim=1)  # a uniform random permutation per image
        cells = (ranks < self.num_mask).reshape(batch_size, r, r)  # exactly num_mask hidden
        mask = cells.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # (B, g, g)
        return mask.flatten(1)  # (B, N)


def avg_dist(mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's AvgDist: mean Euclidean distance of hidden cells to the nearest visible cell.

    Args:
        mask: bool ``(H, W)`` or ``(B, H, W)``, True = hidden, on any grid (pixels, patches);
            distances are in units of that grid's cells.
    Returns:
        a scalar (mean over images of the per-image average); 0 where nothing is hidden.
        An image with every cell hidden has no visible cell and raises ``ValueError``.
    """
    masks = mask.unsqueeze(0) if mask.dim() == 2 else mask
    results = []
    for m in masks.bool():
        hidden = m.nonzero().float()  # (n_hidden, 2)
        visible = (~m).nonzero().float()  # (n_visible, 2)
        if len(hidden) == 0:
            results.append(torch.tensor(0.0))
            continue
        if len(visible) == 0:
            raise ValueError("avg_dist: every cell is hidden, no visible cell to measure from")
        nearest = torch.cat(
            [torch.cdist(chunk, visible).min(dim=1).values for chunk in hidden.split(4096)]
        )
        results.append(nearest.mean())
    return torch.stack(results).mean()


# --- Autoregressive orders and attention masks (AIM, METHODS.md §5.2) -----------------------

ORDERS = ("raster", "spiral", "checkerboard", "random")


def patch_order(kind: str, grid: int, seed: int = 0) -> torch.Tensor:
    """The order in which an autoregressive model reads a ``grid x grid`` patch grid.

    Returns a permutation ``order`` of ``range(grid**2)`` (long ``(N,)``): sequence position
    ``t`` holds the patch with row-major index ``order[t]``. The AIM paper's ablation orders:
    "raster" (row by row, its default), "spiral" (clockwise from the top-left corner inwards),
    "checkerboard" (the cells with even row + column first, then the odd ones, each in raster
    order) and "random" (one fixed permutation drawn from ``seed``, the same for every image).
    """
    n = grid * grid
    if kind == "raster":
        return torch.arange(n)
    if kind == "checkerboard":
        rows, cols = torch.arange(n) // grid, torch.arange(n) % grid
        return torch.argsort((rows + cols) % 2, stable=True)
    if kind == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    if kind == "spiral":
        return _spiral(grid)
    raise ValueError(f"unknown patch order {kind!r}; choose one of {ORDERS}")


def _spiral(grid: int) -> torch.Tensor:
    ids = torch.arange(grid * grid).reshape(grid, grid)
    out = []
    while ids.numel():
        out.append(ids[0])  # the top row, left to right
        ids = ids[1:].T.flip(0)  # turn the rest so its right column becomes the top row
    return torch.cat(out)


def sample_prefix_len(
    batch_size: int, low: int, high: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """AIM's per-sample prefix length ``S ~ Uniform{low, ..., high}`` (long ``(B,)``)."""
    return torch.randint(low, high + 1, (batch_size,), generator=generator)


def prefix_causal_mask(prefix_len: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Prefix-causal attention (AIM §5.2): query q may attend key k iff ``k < S or k <= q``.

    The first S tokens attend to each other bidirectionally (and never to later tokens); every
    later token sees the whole prefix and the tokens before it. S = 0 is plain causal.

    Args:
        prefix_len: long ``(B,)`` prefix lengths S.
        num_tokens: sequence length N.
    Returns:
        bool ``(B, N, N)``, True = allowed (``scaled_dot_product_attention``'s convention).
    """
    pos = torch.arange(num_tokens, device=prefix_len.device)
    causal = pos[None, :] <= pos[:, None]  # (N, N): key <= query
    in_prefix = pos[None, :] < prefix_len[:, None]  # (B, N): key is a prefix token
    return causal[None] | in_prefix[:, None, :]  # (B, N, N)
