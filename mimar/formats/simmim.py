"""SimMIM releases: formats ``simmim-vit`` and ``simmim-swin`` (below).

``simmim-vit`` (``simmim_pretrain__vit_base__img224__800ep.pth``): names from
microsoft/SimMIM @ d3e29bcac950b83edc34ca33fe4404f38309052c: ``models/simmim.py``
(``SimMIM``: ``encoder`` = ``VisionTransformerForSimMIM`` with its ``mask_token``;
``decoder`` = ``Sequential(Conv2d(D, stride^2 * 3, 1), PixelShuffle)``),
``models/vision_transformer.py`` (BEiT-style blocks: ``qkv`` without bias plus ``q_bias`` /
``v_bias``; LayerScale ``gamma_1`` / ``gamma_2``; a relative position bias shared
(``rel_pos_bias.*``) or per block (``blocks.{i}.attn.relative_position_bias_table``); an
absolute ``pos_embed`` only with ``USE_APE``), ``utils.py`` ``save_checkpoint`` (the file is
``{"model": state_dict, "optimizer", "lr_scheduler", "max_accuracy", "epoch", "config"}``,
``config`` a yacs ``CfgNode``).

Import: every encoder weight goes to ``backbone.*`` and the pixel decoder to ``head.conv.*``
(SimMIM's whole pretraining state). The k bias SimMIM does not have is zero (the softmax
cannot see it); export drops ours for the same reason.
"""

from __future__ import annotations

import re

import torch

from mimar.errors import ConfigError
from mimar.formats.family import Converted, Format
from mimar.formats.keymap import Table, merge_qv_biases, refuse_unknown, rename, split_qkv_bias
from mimar.formats.swin_shapes import swin_fields
from mimar.nn import relative_position_index

# official (SimMIM) name -> mimar method name
VIT: Table = (
    ("encoder.patch_embed.proj.{p}", "backbone.patch_embed.proj.{p}"),
    ("encoder.cls_token", "backbone.cls_token"),
    ("encoder.mask_token", "backbone.mask_token"),
    ("encoder.pos_embed", "backbone.pos_embed"),
    (
        "encoder.rel_pos_bias.relative_position_bias_table",
        "backbone.rel_pos_bias.relative_position_bias_table",
    ),
    ("encoder.blocks.{i}.norm1.{p}", "backbone.blocks.{i}.norm1.{p}"),
    ("encoder.blocks.{i}.attn.qkv.weight", "backbone.blocks.{i}.attn.qkv.weight"),
    (
        "encoder.blocks.{i}.attn.relative_position_bias_table",
        "backbone.blocks.{i}.attn.rel_pos_bias.relative_position_bias_table",
    ),
    ("encoder.blocks.{i}.attn.proj.{p}", "backbone.blocks.{i}.attn.proj.{p}"),
    ("encoder.blocks.{i}.gamma_1", "backbone.blocks.{i}.ls1.gamma"),
    ("encoder.blocks.{i}.norm2.{p}", "backbone.blocks.{i}.norm2.{p}"),
    ("encoder.blocks.{i}.mlp.fc1.{p}", "backbone.blocks.{i}.mlp.fc1.{p}"),
    ("encoder.blocks.{i}.mlp.fc2.{p}", "backbone.blocks.{i}.mlp.fc2.{p}"),
    ("encoder.blocks.{i}.gamma_2", "backbone.blocks.{i}.ls2.gamma"),
    ("encoder.norm.{p}", "backbone.norm.{p}"),
    ("decoder.0.{p}", "head.conv.{p}"),
)
_QV = ("attn.q_bias", "attn.v_bias")


def detect_vit(weights: dict[str, torch.Tensor]) -> bool:
    return "encoder.blocks.0.attn.qkv.weight" in weights


def vit_to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    if not any(k.startswith(("encoder.", "decoder.")) for k in weights):
        weights = {f"encoder.{k}": v for k, v in weights.items()}  # the encoder alone
    ignored = {
        k: "derived buffer (recomputed from the grid)"
        for k in weights
        if k.endswith("relative_position_index")
    }
    biases = {k: v for k, v in weights.items() if k.endswith(_QV)}
    rest = {k: v for k, v in weights.items() if k not in ignored and k not in biases}
    out, keys, unknown = rename(rest, VIT)
    refuse_unknown(unknown, "simmim-vit")
    fused, qv_keys = merge_qv_biases(
        biases, lambda stem: "backbone." + stem.removeprefix("encoder.") + "qkv.bias", "simmim-vit"
    )
    out |= fused
    keys |= qv_keys
    return Converted(out, keys, ignored)


def vit_export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """``{"model": official state dict}``, as ``main_simmim.py`` and its fine-tuning
    ``load_pretrained`` read it (relative position indices included, as the official
    ``state_dict()`` has them)."""
    unsupported = {
        "class_token=false": not backbone["class_token"],
        "final_norm=false": not backbone["final_norm"],
        "patch_norm=true": backbone["patch_norm"],
        "proj_bias=false": not backbone["proj_bias"],
    }
    if bad := [name for name, hit in unsupported.items() if hit]:
        raise ConfigError(
            "--format simmim-vit: SimMIM's ViT has no equivalent of "
            f"backbone.{', backbone.'.join(bad)}"
        )
    plain = {k: v for k, v in weights.items() if not k.endswith("attn.qkv.bias")}
    plain = {k: v for k, v in plain.items() if k.startswith(("backbone.", "head."))}
    out, _, unknown = rename(plain, VIT, reverse=True)
    refuse_unknown(unknown, "mimar SimMIM run (for simmim-vit)")
    for key, bias in weights.items():
        if key.endswith("attn.qkv.bias"):
            stem = "encoder." + key.removeprefix("backbone.").removesuffix("qkv.bias")
            out[stem + "q_bias"], out[stem + "v_bias"] = split_qkv_bias(bias)
    grid = backbone["img_size"] // backbone["patch_size"]
    index = relative_position_index(grid, 1)
    for key in [k for k in out if k.endswith("relative_position_bias_table")]:
        out[key.replace("relative_position_bias_table", "relative_position_index")] = index
    return {"model": {k: v.detach().contiguous() for k, v in out.items()}}


SIMMIM_VIT = Format(
    name="simmim-vit",
    method="simmim",
    recipe="simmim/vit_base_in1k.yaml",
    detect=detect_vit,
    to_mimar=vit_to_mimar,
    export=vit_export,
)


# Format ``simmim-swin`` (``simmim_pretrain__swin_base__img192_window6__800ep.pth``): names from
# the same commit's ``models/swin_transformer.py`` (Microsoft's Swin: ``layers.{s}.blocks.{j}``,
# the patch merging at the *end* of stage s as ``layers.{s}.downsample``) and
# ``SwinTransformerForSimMIM`` (``mask_token``). mimar's Swin holds timm's ``SwinTransformer``
# as ``model``, which opens stage s + 1 with that merging (same weights and channel order;
# timm's own ``checkpoint_filter_fn`` renames it the same way).
SWIN: Table = (
    ("encoder.mask_token", "backbone.mask_token"),
    ("encoder.patch_embed.proj.{p}", "backbone.model.patch_embed.proj.{p}"),
    ("encoder.patch_embed.norm.{p}", "backbone.model.patch_embed.norm.{p}"),
    ("encoder.layers.{i}.blocks.{j}.norm1.{p}", "backbone.model.layers.{i}.blocks.{j}.norm1.{p}"),
    (
        "encoder.layers.{i}.blocks.{j}.attn.relative_position_bias_table",
        "backbone.model.layers.{i}.blocks.{j}.attn.relative_position_bias_table",
    ),
    (
        "encoder.layers.{i}.blocks.{j}.attn.qkv.{p}",
        "backbone.model.layers.{i}.blocks.{j}.attn.qkv.{p}",
    ),
    (
        "encoder.layers.{i}.blocks.{j}.attn.proj.{p}",
        "backbone.model.layers.{i}.blocks.{j}.attn.proj.{p}",
    ),
    ("encoder.layers.{i}.blocks.{j}.norm2.{p}", "backbone.model.layers.{i}.blocks.{j}.norm2.{p}"),
    (
        "encoder.layers.{i}.blocks.{j}.mlp.fc1.{p}",
        "backbone.model.layers.{i}.blocks.{j}.mlp.fc1.{p}",
    ),
    (
        "encoder.layers.{i}.blocks.{j}.mlp.fc2.{p}",
        "backbone.model.layers.{i}.blocks.{j}.mlp.fc2.{p}",
    ),
    # official end of stage i - 1 (shifted by _shift_merging) -> timm's start of stage i
    (
        "encoder.merging.{i}.reduction.weight",
        "backbone.model.layers.{i}.downsample.reduction.weight",
    ),
    ("encoder.merging.{i}.norm.{p}", "backbone.model.layers.{i}.downsample.norm.{p}"),
    ("encoder.norm.{p}", "backbone.model.norm.{p}"),
    ("decoder.0.{p}", "head.conv.{p}"),
)
_MERGING = re.compile(r"encoder\.layers\.(\d+)\.downsample\.")
_MERGING_BACK = re.compile(r"encoder\.merging\.(\d+)\.")


def detect_swin(weights: dict[str, torch.Tensor]) -> bool:
    # with its decoder, or the encoder alone (its ``encoder.`` prefix removed by unwrap): the
    # mask token tells it from a timm / Microsoft Swin
    return "encoder.layers.0.blocks.0.attn.qkv.weight" in weights or (
        "mask_token" in weights and "layers.0.blocks.0.attn.qkv.weight" in weights
    )


def swin_to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    if not any(k.startswith(("encoder.", "decoder.")) for k in weights):
        weights = {f"encoder.{k}": v for k, v in weights.items()}  # the encoder alone
    derived = ("relative_position_index", "attn_mask")
    ignored = {k: "derived buffer (recomputed)" for k in weights if k.endswith(derived)}
    shifted = {
        _MERGING.sub(lambda m: f"encoder.merging.{int(m.group(1)) + 1}.", k): k
        for k in weights
        if k not in ignored
    }
    out, keys, unknown = rename({new: weights[old] for new, old in shifted.items()}, SWIN)
    refuse_unknown([shifted[k] for k in unknown], "simmim-swin")
    return Converted(out, {shifted[k]: v for k, v in keys.items()}, ignored)


def swin_export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """``{"model": official state dict}`` of ``SimMIM(SwinTransformerForSimMIM)``, without the
    derived buffers (``relative_position_index``, ``attn_mask``: recomputed by the official
    model; load it with ``strict=False``, as its ``load_pretrained`` does)."""
    parts = {k: v for k, v in weights.items() if k.startswith(("backbone.", "head."))}
    out, _, unknown = rename(parts, SWIN, reverse=True)
    refuse_unknown(unknown, "mimar SimMIM-Swin run (for simmim-swin)")
    official = {
        _MERGING_BACK.sub(lambda m: f"encoder.layers.{int(m.group(1)) - 1}.downsample.", k): v
        for k, v in out.items()
    }
    return {"model": {k: v.detach().contiguous() for k, v in official.items()}}


SIMMIM_SWIN = Format(
    name="simmim-swin",
    method="simmim",
    recipe="simmim/swin_base_in1k.yaml",
    detect=detect_swin,
    to_mimar=swin_to_mimar,
    export=swin_export,
    architecture=swin_fields,
)
