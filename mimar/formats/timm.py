"""timm ViT-family weights (``vit_base_patch16_224.mae.safetensors``): format ``timm``.

Names from timm 1.0 (``timm/models/vision_transformer.py`` ``VisionTransformer``,
``timm/models/beit.py`` ``Beit``, ``timm/models/eva.py`` ``Eva``). mimar's ViT already uses
``VisionTransformer``'s names, so a plain ViT (class token or average pooling, LayerScale
``ls1.gamma``, MAE / DINO / DeiT weights) maps one to one. ``Beit`` and EVA-01-style ``Eva``
(no RoPE, GELU MLP) differ in three places: ``q_bias`` / ``v_bias`` instead of a fused qkv
bias, LayerScale ``gamma_1`` / ``gamma_2``, and a per-block
``attn.relative_position_bias_table``.

A timm ``SwinTransformer`` (``swin_*``, any timm version's layout) is the format's other
variant: :mod:`mimar.formats.timm_swin` maps it into mimar's Swin (a SimMIM Swin run, recipe
``configs/simmim/swin_base_in1k.yaml``), chosen by :attr:`Format.variant` from the weights.

Refused, because mimar's ViT cannot express them: EVA-02 and other ``Eva`` variants with
SwiGLU MLPs (``mlp.fc1_g`` / ``fc1_x``, or packed: ``fc1`` twice as wide as ``fc2``'s input)
or a norm inside the attention / MLP (``attn.norm``, ``mlp.norm``). Rotary position
embeddings (EVA-02) are non-persistent buffers, invisible in the weights: an ``Eva`` with
RoPE but a plain MLP would import as a ViT without it (EVA-02's SwiGLU refuses every released
one). Also refused: timm ViTs with register tokens (``reg_token``), a pre-norm
(``norm_pre``) or a position table without the class token's row (``no_embed_class``). The
classifier (``head.*``) and the pooled classifier's norm (``fc_norm.*``, which
``forward_features`` does not apply) are left out and listed.
"""

from __future__ import annotations

import math

import torch

from mimar.errors import CheckpointError
from mimar.formats import timm_swin
from mimar.formats.family import Converted, Format
from mimar.formats.keymap import Table, merge_qv_biases, refuse_unknown, rename
from mimar.formats.swin_shapes import swin_fields

# timm name -> mimar method name: VisionTransformer's names are ours
VIT: Table = (
    ("patch_embed.proj.{p}", "backbone.patch_embed.proj.{p}"),
    ("patch_embed.norm.{p}", "backbone.patch_embed.norm.{p}"),
    ("cls_token", "backbone.cls_token"),
    ("pos_embed", "backbone.pos_embed"),
    (
        "rel_pos_bias.relative_position_bias_table",  # Beit's shared table
        "backbone.rel_pos_bias.relative_position_bias_table",
    ),
    ("blocks.{i}.norm1.{p}", "backbone.blocks.{i}.norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "backbone.blocks.{i}.attn.qkv.{p}"),
    (
        "blocks.{i}.attn.relative_position_bias_table",  # Beit's per-block table
        "backbone.blocks.{i}.attn.rel_pos_bias.relative_position_bias_table",
    ),
    ("blocks.{i}.attn.proj.{p}", "backbone.blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.ls1.gamma", "backbone.blocks.{i}.ls1.gamma"),
    ("blocks.{i}.gamma_1", "backbone.blocks.{i}.ls1.gamma"),  # Beit / Eva
    ("blocks.{i}.norm2.{p}", "backbone.blocks.{i}.norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "backbone.blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "backbone.blocks.{i}.mlp.fc2.{p}"),
    ("blocks.{i}.ls2.gamma", "backbone.blocks.{i}.ls2.gamma"),
    ("blocks.{i}.gamma_2", "backbone.blocks.{i}.ls2.gamma"),
    ("norm.{p}", "backbone.norm.{p}"),
)
# key fragment -> why mimar's ViT cannot hold such a model
_REFUSED = {
    "rope": "rotary position embeddings (EVA-02)",
    "mlp.fc1_g": "a SwiGLU MLP (EVA-02)",
    "mlp.fc1_x": "a SwiGLU MLP (EVA-02)",
    "mlp.norm": "a norm inside the MLP (EVA-02's sub-LN)",
    "attn.norm": "a norm inside the attention",
    "attn.q_proj": "separate q/k/v projections (EVA-02)",
    "reg_token": "register tokens",
    "norm_pre": "a norm before the blocks",
    "attn_pool": "attention pooling (MAP head)",
}
_IGNORED = {
    "head.": "the classifier (not part of the pretrained backbone)",
    "fc_norm.": "the pooled classifier's norm (applied after pooling, outside forward_features)",
}


def detect(weights: dict[str, torch.Tensor]) -> bool:
    return "patch_embed.proj.weight" in weights and any(
        k.startswith(("blocks.0.", "layers.0.")) for k in weights
    )


def to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    for fragment, why in _REFUSED.items():
        if hit := next((k for k in weights if fragment in k), None):
            raise CheckpointError(f"this timm model has {why} ({hit}): mimar's ViT cannot hold it")
    fc1, fc2 = weights.get("blocks.0.mlp.fc1.weight"), weights.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
        raise CheckpointError(
            f"this timm model has a gated MLP packed in fc1 ({tuple(fc1.shape)} vs fc2 "
            f"{tuple(fc2.shape)}: EVA-02's SwiGLU, whose rotary position embeddings are not "
            "in the weights either): mimar's ViT cannot hold it"
        )
    ignored = {k: why for k in weights for p, why in _IGNORED.items() if k.startswith(p)}
    ignored |= {
        k: "derived buffer (recomputed from the grid)"
        for k in weights
        if k.endswith(("relative_position_index", "k_bias"))
    }
    biases = {k: v for k, v in weights.items() if k.endswith(("attn.q_bias", "attn.v_bias"))}
    rest = {k: v for k, v in weights.items() if k not in ignored and k not in biases}
    out, keys, unknown = rename(rest, VIT)
    refuse_unknown(unknown, "timm")
    fused, qv_keys = merge_qv_biases(biases, lambda stem: f"backbone.{stem}qkv.bias", "timm")
    _check_embed_class(out)
    return Converted(out | fused, keys | qv_keys, ignored)


def _check_embed_class(weights: dict[str, torch.Tensor]) -> None:
    """timm's ``no_embed_class``: a class token but a table of patch positions only."""
    pos = weights.get("backbone.pos_embed")
    if pos is not None and "backbone.cls_token" in weights:
        n = pos.shape[1]
        if math.isqrt(n) ** 2 == n and math.isqrt(n - 1) ** 2 != n - 1:
            raise CheckpointError(
                f"pos_embed {tuple(pos.shape)} has no class-token row (timm's no_embed_class): "
                "mimar's ViT adds a position to its class token"
            )


# a timm Swin (mimar.formats.timm_swin) imports as a SimMIM Swin run, its width etc. read as
# simmim-swin's; both layouts are one --format
TIMM_SWIN = Format(
    name="timm",
    method="simmim",
    recipe="simmim/swin_base_in1k.yaml",
    detect=timm_swin.is_swin,
    to_mimar=timm_swin.to_mimar,
    architecture=swin_fields,
)
TIMM = Format(
    name="timm",
    method="simmim",
    recipe="simmim/vit_base_in1k.yaml",
    detect=detect,
    to_mimar=to_mimar,
    variant=lambda weights: TIMM_SWIN if timm_swin.is_swin(weights) else TIMM,
)
