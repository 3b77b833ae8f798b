"""EVA-01 MIM releases (``eva_psz14.pt``): format ``eva``.

Names from baaivision/EVA @ 5623d08bb08a8268c7bc18e1d9b8b4bd651fe4d9, ``EVA-01/eva/``:
``modeling_pretrain.py`` (``VisionTransformerForMaskedImageModeling``: ``patch_embed.proj``,
``cls_token``, ``mask_token``, ``pos_embed``, an optional shared ``rel_pos_bias``, ``blocks``,
``norm``, the regression head ``lm_head``), ``modeling_finetune.py`` (BEiT-style ``Block``:
``norm1``, ``attn.qkv`` without bias plus ``q_bias`` / ``v_bias``, an optional per-block
``attn.relative_position_bias_table``, ``attn.proj``, ``norm2``, ``mlp.fc1`` / ``fc2``,
LayerScale ``gamma_1`` / ``gamma_2``), ``utils.py`` ``save_model`` (``{"model": state_dict,
"optimizer", "epoch", "scaler", "args"}``; DeepSpeed runs: ``{"module": ...}``).

Import: the student ViT -> ``backbone.*`` and ``lm_head`` -> ``lm_head`` (EVA's whole
pretraining state). The CLIP teacher is never in the release (nor in a mimar checkpoint): the
run's config keeps the recipe's ``teacher.*``; set its files when continuing. EVA-01's
``subln`` / ``postnorm`` / xattn variants are not in the pretraining code and are refused as
unknown keys.
"""

from __future__ import annotations

import torch

from mimar.formats.family import Converted, Format
from mimar.formats.keymap import Table, merge_qv_biases, refuse_unknown, rename, split_qkv_bias

# official (EVA-01) name -> mimar method name
EVA: Table = (
    ("patch_embed.proj.{p}", "backbone.patch_embed.proj.{p}"),
    ("cls_token", "backbone.cls_token"),
    ("mask_token", "backbone.mask_token"),
    ("pos_embed", "backbone.pos_embed"),
    (
        "rel_pos_bias.relative_position_bias_table",
        "backbone.rel_pos_bias.relative_position_bias_table",
    ),
    ("blocks.{i}.norm1.{p}", "backbone.blocks.{i}.norm1.{p}"),
    ("blocks.{i}.attn.qkv.weight", "backbone.blocks.{i}.attn.qkv.weight"),
    (
        "blocks.{i}.attn.relative_position_bias_table",
        "backbone.blocks.{i}.attn.rel_pos_bias.relative_position_bias_table",
    ),
    ("blocks.{i}.attn.proj.{p}", "backbone.blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.gamma_1", "backbone.blocks.{i}.ls1.gamma"),
    ("blocks.{i}.norm2.{p}", "backbone.blocks.{i}.norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "backbone.blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "backbone.blocks.{i}.mlp.fc2.{p}"),
    ("blocks.{i}.gamma_2", "backbone.blocks.{i}.ls2.gamma"),
    ("norm.{p}", "backbone.norm.{p}"),
    ("lm_head.{p}", "lm_head.{p}"),
)


def detect(weights: dict[str, torch.Tensor]) -> bool:
    return "lm_head.weight" in weights and "blocks.0.attn.qkv.weight" in weights


def to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    ignored = {
        k: "derived buffer (recomputed from the grid)"
        for k in weights
        if k.endswith("relative_position_index")
    }
    biases = {k: v for k, v in weights.items() if k.endswith(("attn.q_bias", "attn.v_bias"))}
    rest = {k: v for k, v in weights.items() if k not in ignored and k not in biases}
    out, keys, unknown = rename(rest, EVA)
    refuse_unknown(unknown, "eva")
    fused, qv_keys = merge_qv_biases(biases, lambda stem: f"backbone.{stem}qkv.bias", "eva")
    out |= fused
    head = out.get("lm_head.weight")
    dim = int(head.shape[0]) if head is not None else None
    return Converted(out, keys | qv_keys, ignored, teacher_dim=dim)


def export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """``{"model": official state dict}``, as ``save_model`` writes it (relative position
    indices left out: the official model recomputes them; load with ``strict=False``)."""
    parts = {
        k: v
        for k, v in weights.items()
        if k.startswith(("backbone.", "lm_head.")) and not k.endswith("attn.qkv.bias")
    }
    out, _, unknown = rename(parts, EVA, reverse=True)
    refuse_unknown(unknown, "mimar EVA run (for eva)")
    for key, bias in weights.items():
        if key.endswith("attn.qkv.bias"):  # the k bias is dropped: softmax-invariant
            stem = key.removeprefix("backbone.").removesuffix("qkv.bias")
            out[stem + "q_bias"], out[stem + "v_bias"] = split_qkv_bias(bias)
    return {"model": {k: v.detach().contiguous() for k, v in out.items()}}


EVA01 = Format(
    name="eva",
    method="eva",
    recipe="eva/vit_giant_clip_l14_merged30m.yaml",
    detect=detect,
    to_mimar=to_mimar,
    export=export,
)
