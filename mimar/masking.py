"""Corruptions: mask generators, autoregressive orders and their attention masks.

Convention used everywhere in mimar: a mask is a bool tensor ``hidden`` of shape ``(B, N)``
over the model's patch grid in row-major order, True = hidden / to be predicted.
Every generator takes a ``torch.Generator`` so the engine can make draws a pure function of
(seed, step): that is what makes resume and multi-process runs exact.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


class SimMIMMasking:
    """SimMIM's random mask of coarse square cells (docs/METHODS.md §2.1).

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


class BlockMasking:
    """BEiT's block-wise mask generator, as EVA uses it (docs/METHODS.md §1.3, BEiT/EVA
    ``masking_generator.py``).

    Rectangles are added one at a time until ``num_masking_patches`` patches are hidden. Each
    rectangle gets an area ~ U(min_num_patches, budget) (budget = patches still wanted, capped
    by ``max_num_patches``) and an aspect ratio log-uniform in ``[min_aspect, 1/min_aspect]``;
    its sides are ``round(sqrt(area * aspect))`` x ``round(sqrt(area / aspect))`` (so after
    rounding the sides may leave the aspect range by up to half a patch per side). A rectangle
    is kept only if it fits strictly inside the grid and adds between 1 and ``budget`` new
    patches; after 10 failed attempts the generator stops.

    Tolerance: the hidden count never exceeds ``num_masking_patches``; it falls short only
    when 10 attempts in a row fail, i.e. when the rectangles that fit add more patches than the
    remaining budget. Measured over 4096 images: EVA's 105 of 256 (min 16) gives 104.4 on
    average (36 % of images short, by at most 12); the tiny recipe's 26 of 64 (min 4) gives
    25.96 (4 % short, by at most 2). ``tests/test_eva.py`` pins a batch mean >= 90 % of the
    target whenever ``min_num_patches <= num_masking_patches / 4`` on 6x6 to 16x16 grids;
    with ``min_num_patches`` near or above the target the mask can stay far smaller. EVA logs
    the realised ``mask_ratio`` every step.

    Random draws come from Python's ``random.Random`` (as BEiT's generator uses ``random``),
    seeded once per call from the given ``torch.Generator``: same generator state, same masks.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 4,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (grid, grid) if isinstance(grid, int) else grid
        if not 0 < num_masking_patches < self.height * self.width:
            raise ValueError(
                f"num_masking_patches must be in [1, {self.height * self.width - 1}] for a "
                f"{self.height}x{self.width} grid, got {num_masking_patches}"
            )
        if min_num_patches < 1:
            raise ValueError(f"min_num_patches must be >= 1, got {min_num_patches}")
        if not 0 < min_aspect <= 1:
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches or num_masking_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = random.Random(seed)
        masks = np.zeros((batch_size, self.height, self.width), dtype=bool)
        for mask in masks:
            for top, left, h, w in self.sample_blocks(rng):
                mask[top : top + h, left : left + w] = True
        return torch.from_numpy(masks).flatten(1)  # (B, N), True = hidden

    def sample_blocks(self, rng: random.Random) -> list[tuple[int, int, int, int]]:
        """The rectangles ``(top, left, height, width)`` of one image's mask, in order."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks, count = [], 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            block = self._one_block(mask, budget, rng)
            if block is None:
                break  # 10 attempts failed: give up, the count stays below the target
            top, left, h, w = block
            count += h * w - int(mask[top : top + h, left : left + w].sum())
            mask[top : top + h, left : left + w] = True
            blocks.append(block)
        return blocks

    def _one_block(self, mask: np.ndarray, budget: int, rng: random.Random):
        for _attempt in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:  # strict, as in BEiT
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= budget:
                    return top, left, h, w
        return None


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


# --- Autoregressive orders and attention masks (AIM, docs/METHODS.md §5.2) -----------------------

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


# --- Clusters and the cluster-causal mask (D-iGPT, docs/METHODS.md §6.1-6.2) ----------------------


def cluster_index(grid: int, clusters_per_side: int) -> torch.Tensor:
    """The row-major patch ids of each cluster of a ``grid x grid`` patch grid.

    The grid is cut into ``K = clusters_per_side**2`` square clusters of
    ``s = (grid / clusters_per_side)**2`` patches (D-iGPT: 2 per side = 4 quadrants of 7x7
    patches at 14x14). Returns long ``(K, s)``: row k lists cluster k's patches in
    row-major order; clusters are numbered row-major (top-left, top-right, bottom-left, ...).
    """
    if clusters_per_side < 1 or grid % clusters_per_side:
        raise ValueError(
            f"the {grid}x{grid} patch grid cannot be cut into {clusters_per_side}x"
            f"{clusters_per_side} equal clusters: set method.clusters_per_side to a divisor of "
            f"{grid} (choices: {[d for d in range(2, grid + 1) if grid % d == 0]})"
        )
    c = grid // clusters_per_side  # patches per cluster side
    ids = torch.arange(grid * grid).reshape(clusters_per_side, c, clusters_per_side, c)
    return ids.permute(0, 2, 1, 3).reshape(clusters_per_side**2, c * c)


def random_cluster_orders(
    batch_size: int, num_clusters: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One uniformly random permutation of the clusters per image: long ``(B, K)``."""
    return torch.rand(batch_size, num_clusters, generator=generator).argsort(dim=1)


def cluster_causal_mask(num_slots: int, cluster_size: int) -> torch.Tensor:
    """D-iGPT's attention mask over ``[CLS] + num_slots clusters`` (docs/METHODS.md §6.2).

    Token layout: index 0 is the class token, then the clusters in the order they are read,
    ``cluster_size`` tokens each. A token of cluster slot i may attend to every token of slots
    <= i (bidirectional inside a cluster, causal across clusters). The class token attends to
    everything and is visible only to itself and to the last slot, i.e. it behaves like a
    member of the last cluster. (The official code puts the class token last; position in
    the sequence does not matter to attention under a mask, so ours sits first as in every
    mimar ViT.) Returns bool ``(T, T)``, ``T = 1 + num_slots * cluster_size``, True = allowed.
    """
    slot = torch.arange(num_slots).repeat_interleave(cluster_size)  # (T - 1,)
    slot = torch.cat([torch.tensor([num_slots - 1]), slot])  # the class token: last slot
    allowed = slot[None, :] <= slot[:, None]  # key slot <= query slot
    allowed[0] = True  # the class token attends to everything
    return allowed


# --- MAE-style random keep (iTPN pixel, docs/METHODS.md §4.1.2) -----------------------------------


def random_keep(
    batch_size: int, num_patches: int, num_keep: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """MAE's random masking, as the ids of the kept patches: long ``(B, num_keep)``.

    Per image, the ``num_keep`` patches with the smallest ``U[0, 1)`` noise are kept (a uniform
    random subset); ids are returned sorted ascending (row-major), where MAE keeps the shuffle
    order; token order is immaterial to attention once positions are added.
    """
    if not 0 < num_keep <= num_patches:
        raise ValueError(f"num_keep must be in [1, {num_patches}], got {num_keep}")
    noise = torch.rand(batch_size, num_patches, generator=generator)
    return noise.argsort(dim=1)[:, :num_keep].sort(dim=1).values


def hidden_from_keep(keep_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bool ``(B, N)``, True = hidden: every patch not listed in ``keep_ids (B, n)``."""
    hidden = torch.ones(keep_ids.shape[0], num_patches, dtype=torch.bool, device=keep_ids.device)
    return hidden.scatter(1, keep_ids, False)
