"""Hugging Face ``save_pretrained`` folders of ``ViTModel`` / ``ViTMAEModel`` (and their
``...ForImageClassification`` / ``ViTMAEForPreTraining`` under ``vit.``): format
``transformers``.

Names from transformers' ``models/vit/modeling_vit.py`` and ``models/vit_mae/modeling_vit_mae.py``
as they are saved (transformers 4.x and 5.25 write the same file names: ``embeddings.*``,
``encoder.layer.{i}.attention.attention.{query,key,value}``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense``, ``layernorm_before`` / ``layernorm_after``, the final
``layernorm``). ``config.json`` tells what the weights cannot: ``num_attention_heads``,
``layer_norm_eps`` (1e-12 for ViT), and for ViTMAE the fixed sin-cos position table.

Separate q, k, v projections are fused into mimar's ``qkv`` (rows q, k, v, as timm fuses
them); the k bias is kept (it is a real weight here). ``last_hidden_state`` of a model is
mimar's ``tokens``. Left out and listed: the pooler (``pooler.dense``, not part of
``last_hidden_state``), a classifier, ViTMAE's pixel decoder (mimar has no MAE method).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mimar import writes
from mimar.errors import CheckpointError, ConfigError
from mimar.formats.family import Converted, Format
from mimar.formats.keymap import Table, refuse_unknown, rename

# transformers name -> mimar method name (q, k, v fused separately)
VIT: Table = (
    ("embeddings.cls_token", "backbone.cls_token"),
    ("embeddings.mask_token", "backbone.mask_token"),
    ("embeddings.position_embeddings", "backbone.pos_embed"),
    ("embeddings.patch_embeddings.projection.{p}", "backbone.patch_embed.proj.{p}"),
    ("encoder.layer.{i}.layernorm_before.{p}", "backbone.blocks.{i}.norm1.{p}"),
    ("encoder.layer.{i}.attention.output.dense.{p}", "backbone.blocks.{i}.attn.proj.{p}"),
    ("encoder.layer.{i}.layernorm_after.{p}", "backbone.blocks.{i}.norm2.{p}"),
    ("encoder.layer.{i}.intermediate.dense.{p}", "backbone.blocks.{i}.mlp.fc1.{p}"),
    ("encoder.layer.{i}.output.dense.{p}", "backbone.blocks.{i}.mlp.fc2.{p}"),
    ("layernorm.{p}", "backbone.norm.{p}"),
)
_QKV = ("query", "key", "value")
_IGNORED = {
    "pooler.": "the pooler (not part of last_hidden_state)",
    "classifier.": "the classifier (not part of the pretrained backbone)",
    "decoder.": "ViTMAE's pixel decoder (mimar has no MAE method)",
}


def detect(weights: dict[str, torch.Tensor]) -> bool:
    return any(
        k.removeprefix("vit.") == "embeddings.patch_embeddings.projection.weight" for k in weights
    )


def to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    ignored = {k: why for k in weights for p, why in _IGNORED.items() if k.startswith(p)}
    weights = {k.removeprefix("vit."): v for k, v in weights.items() if k not in ignored}
    qkv = {k: v for k, v in weights.items() if ".attention.attention." in k}
    out, keys, unknown = rename({k: v for k, v in weights.items() if k not in qkv}, VIT)
    refuse_unknown(unknown, "transformers")
    depth = 1 + max((int(k.split(".")[2]) for k in qkv), default=-1)
    for i in range(depth):
        for p in ("weight", "bias"):
            names = [f"encoder.layer.{i}.attention.attention.{n}.{p}" for n in _QKV]
            present = [n for n in names if n in qkv]
            if not present:
                continue
            if len(present) < 3:
                refuse_unknown(present, "transformers (q, k, v incomplete)")
            target = f"backbone.blocks.{i}.attn.qkv.{p}"
            out[target] = torch.cat([qkv.pop(n) for n in names])
            keys |= {n: f"{target}[{n.split('.')[-2][0]}]" for n in names}
    refuse_unknown(qkv, "transformers")
    return Converted(out, keys, ignored, fields=_config_fields(extra.get("hf_config") or {}))


def _config_fields(config: dict) -> dict:
    """What ``config.json`` says and the weights cannot: heads, eps, sin-cos positions."""
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(
            f"config.json hidden_act={config['hidden_act']!r}: mimar's ViT uses exact GELU"
        )
    fields = {}
    if "num_attention_heads" in config:
        fields["num_heads"] = config["num_attention_heads"]
    if "layer_norm_eps" in config:
        fields["norm_eps"] = config["layer_norm_eps"]
    if config.get("model_type") == "vit_mae":
        fields["pos_embed"] = "sincos"  # ViTMAE's table is fixed (requires_grad=False)
    return fields


def export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """``{"config.json": ..., "model.safetensors": ...}`` of a ``ViTModel`` folder."""
    unsupported = {
        "class_token=false": not backbone["class_token"],
        "pos_embed=none": backbone["pos_embed"] == "none",
        "rel_pos_bias": backbone["rel_pos_bias"] != "none",
        "init_values (LayerScale)": backbone["init_values"] is not None,
        "qkv_bias=false": not backbone["qkv_bias"],
        "proj_bias=false": not backbone["proj_bias"],
        "patch_norm=true": backbone["patch_norm"],
        "final_norm=false": not backbone["final_norm"],
    }
    if bad := [name for name, hit in unsupported.items() if hit]:
        raise ConfigError(
            "--format transformers: ViTModel has no equivalent of "
            f"backbone.{', backbone.'.join(bad)}"
        )
    plain = {
        k: v for k, v in weights.items() if k.startswith("backbone.") and ".attn.qkv." not in k
    }
    out, _, unknown = rename(plain, VIT, reverse=True)
    refuse_unknown(unknown, "mimar run (for transformers)")
    for key, value in weights.items():
        if ".attn.qkv." in key:
            i, p = key.split(".")[2], key.split(".")[-1]
            for name, part in zip(_QKV, value.chunk(3), strict=True):
                out[f"encoder.layer.{i}.attention.attention.{name}.{p}"] = part
    d = backbone["embed_dim"]
    config = {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": d,
        "num_hidden_layers": backbone["depth"],
        "num_attention_heads": backbone["num_heads"],
        "intermediate_size": round(d * backbone["mlp_ratio"]),
        "hidden_act": "gelu",
        "layer_norm_eps": backbone["norm_eps"],
        "image_size": backbone["img_size"],
        "patch_size": backbone["patch_size"],
        "num_channels": backbone["in_chans"],
        "qkv_bias": True,
    }
    tensors = {k: v.detach().contiguous() for k, v in out.items()}
    return {"config.json": config, "model.safetensors": tensors}


def write(release: dict, out: Path) -> None:
    """A ``save_pretrained`` folder: ``ViTModel.from_pretrained(out)`` loads it."""
    from safetensors.torch import save_file

    writes.write_text(out / "config.json", json.dumps(release["config.json"], indent=2), "export")
    tensors = release["model.safetensors"]
    writes.save_with(out / "model.safetensors", lambda name: save_file(tensors, name), "export")


TRANSFORMERS = Format(
    name="transformers",
    method="simmim",
    recipe="simmim/vit_base_in1k.yaml",
    detect=detect,
    to_mimar=to_mimar,
    export=export,
    write=write,
)
