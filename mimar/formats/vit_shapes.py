"""A ViT's architecture read from its weights (mimar names, ``backbone.`` prefix removed).

What the tensors tell: width, depth, MLP width, patch size, input channels, class token,
position table (and from its length the image size), relative position bias (shared, per
block or none, and from the table's length the grid), q/v biases, attention / MLP biases,
LayerScale, mask token, final norm, a norm after the patch projection. What they cannot tell
(number of heads, LayerNorm eps, a fixed sin-cos table vs a learned one, the init value of
LayerScale) comes from the recipe.
"""

from __future__ import annotations

import math

import torch

from mimar.errors import CheckpointError

SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
BLOCK_TABLE = "blocks.0.attn.rel_pos_bias.relative_position_bias_table"


def vit_fields(weights: dict[str, torch.Tensor], recipe: dict) -> dict:
    """The ``backbone.*`` fields of a mimar ViT holding ``weights``; ``recipe`` is the recipe's
    backbone section (its ``pos_embed`` and ``init_values`` are kept where they fit)."""
    proj = _need(weights, "patch_embed.proj.weight")  # (D, C, p, p)
    width, in_chans, patch, _ = proj.shape
    depth = 1 + max((int(k.split(".")[1]) for k in weights if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise CheckpointError("no blocks.{i}.* weights: not a ViT")
    fc1 = _need(weights, "blocks.0.mlp.fc1.weight")
    class_token = "cls_token" in weights
    fields = {
        "name": "vit",
        "embed_dim": int(width),
        "in_chans": int(in_chans),
        "patch_size": int(patch),
        "depth": depth,
        "mlp_ratio": fc1.shape[0] / width,
        "class_token": class_token,
        "qkv_bias": "blocks.0.attn.qkv.bias" in weights,
        "proj_bias": "blocks.0.attn.proj.bias" in weights,
        "use_mask_token": "mask_token" in weights or bool(recipe.get("use_mask_token")),
        "final_norm": "norm.weight" in weights,
        "patch_norm": "patch_embed.norm.weight" in weights,
        "rel_pos_bias": "shared"
        if SHARED_TABLE in weights
        else "per_block"
        if BLOCK_TABLE in weights
        else "none",
    }
    gamma = "blocks.0.ls1.gamma" in weights
    fields["init_values"] = (recipe.get("init_values") or 0.1) if gamma else None
    if "pos_embed" in weights:  # a fixed sin-cos table loads as a learned one would
        sincos = recipe.get("pos_embed") == "sincos"
        fields["pos_embed"] = "sincos" if sincos else "learn"
    else:  # a fixed sin-cos table need not be stored (ml-aim computes it on the fly)
        fields["pos_embed"] = "sincos" if recipe.get("pos_embed") == "sincos" else "none"
    if (grid := weights_grid(weights, class_token)) is not None:
        fields["img_size"] = grid * int(patch)
    return fields


def weights_grid(weights: dict[str, torch.Tensor], class_token: bool) -> int | None:
    """The patch grid side the position table (or else the relative position table) was
    made for; None when there is neither."""
    if "pos_embed" in weights:
        n = weights["pos_embed"].shape[1] - int(class_token)
        return _side(n, "pos_embed", weights["pos_embed"].shape)
    table = weights.get(SHARED_TABLE, weights.get(BLOCK_TABLE))
    if table is not None:  # (2g - 1)^2 + 3 rows (BEiT: 3 for the class token's relations)
        side = _side(table.shape[0] - 3, "relative_position_bias_table", table.shape)
        return (side + 1) // 2
    return None


def _side(n: int, key: str, shape) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{key} of shape {tuple(shape)} is not a square grid")
    return side


def _need(weights: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in weights:
        raise CheckpointError(f"no {key} in the weights: not a ViT this format describes")
    return weights[key]
