"""A Swin's architecture read from its weights (mimar names, ``backbone.`` removed: timm's
``SwinTransformer`` under ``model.*``), for ``simmim-swin`` and ``timm`` Swin imports.

What the tensors tell: width, patch size, input channels, stage depths, heads per stage (the
relative position tables' columns), the window (their rows), MLP width, qkv bias. What they
do not: the image size. A stage whose grid is smaller than the window shrinks its window to
the grid (official Swin and timm alike), and its smaller table then tells the size exactly
(SimMIM's Swin-L: window 12 at 192 px, 6 at the last stage). Otherwise the recipe's size is
kept when the window tiles every stage of it (SimMIM's 192 px with window 6), else the size
whose last stage is one window (timm's ``swin_*_window7_224``: 7 x 4 x 8 = 224).
"""

from __future__ import annotations

import logging
import math

import torch

from mimar.errors import CheckpointError

log = logging.getLogger("mimar")
_TABLE = "model.layers.{s}.blocks.0.attn.relative_position_bias_table"


def swin_fields(weights: dict[str, torch.Tensor], recipe: dict) -> dict:
    """The ``backbone.*`` fields of a mimar Swin holding ``weights``; ``recipe`` is the
    recipe's backbone section (its ``img_size`` is kept where the window tiles it)."""
    if "model.patch_embed.proj.weight" not in weights:
        raise CheckpointError("no patch_embed.proj.weight in the weights: not a Swin")
    proj = weights["model.patch_embed.proj.weight"]  # (C, in, p, p)
    blocks = [k.split(".") for k in weights if ".blocks." in k and k.endswith("norm1.weight")]
    stages = 1 + max(int(parts[2]) for parts in blocks)
    depths = [sum(1 for parts in blocks if int(parts[2]) == s) for s in range(stages)]
    tables = [weights[_TABLE.format(s=s)] for s in range(stages)]  # ((2w - 1)^2, heads)
    windows = [(_side(t) + 1) // 2 for t in tables]
    fc1 = weights["model.layers.0.blocks.0.mlp.fc1.weight"]
    fields = {
        "name": "swin",
        "embed_dim": int(proj.shape[0]),
        "in_chans": int(proj.shape[1]),
        "patch_size": int(proj.shape[2]),
        "depths": depths,
        "num_heads": [int(t.shape[1]) for t in tables],
        "window_size": windows[0],
        "mlp_ratio": fc1.shape[0] / proj.shape[0],
        "qkv_bias": "model.layers.0.blocks.0.attn.qkv.bias" in weights,
        "use_mask_token": True,
    }
    size = _img_size(windows, int(proj.shape[2]), recipe.get("img_size"))
    if size is not None:
        fields["img_size"] = size
    return fields


def _img_size(windows: list[int], patch: int, recipe_size: int | None) -> int | None:
    """The image size the weights imply, or None to keep the recipe's (see the docstring)."""
    window, last = windows[0], len(windows) - 1
    if shrunk := [s for s, w in enumerate(windows) if w < window]:
        s = shrunk[0]  # the first stage whose grid is smaller than the window: its grid
        return windows[s] * patch * 2**s
    grids = [recipe_size // (patch * 2**s) for s in range(last + 1)] if recipe_size else []
    if grids and recipe_size % (patch * 2**last) == 0 and all(g % window == 0 for g in grids):
        return None
    size = window * patch * 2**last
    log.info(
        "backbone.img_size=%d: not in the weights (no position table); the size whose last "
        "stage is one %dx%d window, as timm's Swin names say (override backbone.img_size=N)",
        size, window, window,
    )  # fmt: skip
    return size


def _side(table: torch.Tensor) -> int:
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise CheckpointError(
            f"a relative_position_bias_table of shape {tuple(table.shape)} is not a square "
            "window's: mimar's Swin has square windows"
        )
    return side
