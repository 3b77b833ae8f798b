"""Export a pretrained ViT to timm: a safetensors file plus the kwargs to build the model."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from mimar.backbones.vit import ViT
from mimar.config import to_dict
from mimar.errors import ConfigError


def timm_kwargs(backbone: ViT) -> dict:
    """kwargs for ``timm.create_model("vit_base_patch16_224", num_classes=0, **kwargs)``.

    ``fc_norm=False`` keeps timm's final ``norm`` inside ``forward_features`` so that its
    tokens equal mimar's ``tokens``; pooling is the class token when there is one, else mean.
    """
    c = backbone.cfg
    return {
        "img_size": c.img_size,
        "patch_size": c.patch_size,
        "in_chans": c.in_chans,
        "embed_dim": c.embed_dim,
        "depth": c.depth,
        "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_ratio,
        "qkv_bias": c.qkv_bias,
        "proj_bias": c.proj_bias,
        "init_values": c.init_values,
        "class_token": c.class_token,
        "global_pool": "token" if c.class_token else "avg",
        "fc_norm": False,
        "pos_embed": "none" if c.pos_embed == "none" else "learn",
        "no_embed_class": False,
        **({"embed_norm_layer": "layernorm"} if c.patch_norm else {}),
    }


def export_timm(backbone: ViT, out: str | Path) -> tuple[Path, Path]:
    if not isinstance(backbone, ViT):
        raise ConfigError(
            f"--format timm exports mimar's ViT; this run's backbone is {type(backbone).__name__}"
        )
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end with .safetensors, got {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {
        k: v.detach().contiguous().cpu()
        for k, v in backbone.state_dict().items()
        if k != "mask_token"  # a pretraining-only parameter timm's ViT does not have
    }
    save_file(weights, str(out))
    meta = {
        "timm_model": "vit_base_patch16_224",
        "kwargs": timm_kwargs(backbone),
        "mimar_backbone": to_dict(backbone.cfg),
    }
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2))
    return out, meta_path
