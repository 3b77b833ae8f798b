"""AIM v1 releases in apple/ml-aim's layout (the Hugging Face ``pytorch_model.bin`` and
``aim_600m_2bimgs_attnprobe_backbone.pth`` ...): format ``aim``.

Names from apple/ml-aim @ bd9e06893f3ad68bda56b34ac2158fda2680b7fc, ``aim-v1/aim/v1/torch/``:
``models.py`` (``AIM``: ``preprocessor``, ``trunk``, ``head``; ``Transformer``: ``blocks``,
``post_trunk_norm``, no attention-proj / MLP biases by default) and ``layers.py``
(``ViTPreprocessor.patchifier`` = ``PatchEmbed`` with ``proj`` and a LayerNorm ``norm``; a
sin-cos position table computed on the fly, so not stored; ``Block``: ``norm_1``, ``attn.qkv``,
``attn.proj``, ``norm_2``, ``mlp.fc1`` / ``fc2``; every LayerNorm ``eps=1e-6``).

The release holds the trunk and the attentive-probe classifier (``head.*``: ``k``, ``v``,
``cls_token``, ``linear``, ``bn``), a downstream head, not AIM's pretraining MLP head: the
trunk goes to ``backbone.*``, the probe is left out (listed), the pretraining head starts
fresh. (ml-l3m's training layout, with separate q/k/v projections and the MLP head, is the
``aim-l3m`` format, not written yet.)
"""

from __future__ import annotations

import torch

from mimar.errors import ConfigError
from mimar.formats.family import Converted, Format
from mimar.formats.keymap import Table, refuse_unknown, rename

# official (ml-aim) name -> mimar method name
AIM: Table = (
    ("preprocessor.patchifier.proj.{p}", "backbone.patch_embed.proj.{p}"),
    ("preprocessor.patchifier.norm.{p}", "backbone.patch_embed.norm.{p}"),
    ("preprocessor.cls_token", "backbone.cls_token"),  # cls_token=True variants only
    ("preprocessor.pos_embed", "backbone.pos_embed"),  # pos_embed_type="absolute" only
    ("trunk.blocks.{i}.norm_1.{p}", "backbone.blocks.{i}.norm1.{p}"),
    ("trunk.blocks.{i}.attn.qkv.{p}", "backbone.blocks.{i}.attn.qkv.{p}"),
    ("trunk.blocks.{i}.attn.proj.{p}", "backbone.blocks.{i}.attn.proj.{p}"),
    ("trunk.blocks.{i}.norm_2.{p}", "backbone.blocks.{i}.norm2.{p}"),
    ("trunk.blocks.{i}.mlp.fc1.{p}", "backbone.blocks.{i}.mlp.fc1.{p}"),
    ("trunk.blocks.{i}.mlp.fc2.{p}", "backbone.blocks.{i}.mlp.fc2.{p}"),
    ("trunk.post_trunk_norm.{p}", "backbone.norm.{p}"),
)
NORM_EPS = 1e-6  # layers.LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def detect(weights: dict[str, torch.Tensor]) -> bool:
    return "preprocessor.patchifier.proj.weight" in weights


def to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    ignored = {
        k: "the attentive-probe classifier (downstream, not AIM's pretraining head)"
        for k in weights
        if k.startswith("head.")
    }
    out, keys, unknown = rename({k: v for k, v in weights.items() if k not in ignored}, AIM)
    refuse_unknown(unknown, "aim (ml-aim)")
    return Converted(out, keys, ignored, fields={"norm_eps": NORM_EPS})


def export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """The state dict ``AIM.load_state_dict(..., strict=False)`` takes (no probe head: train
    one with ``mimar eval attentive``)."""
    if not backbone["patch_norm"]:
        raise ConfigError("--format aim: ml-aim's patchifier always has a norm (patch_norm=true)")
    trunk = {
        k: v for k, v in weights.items() if k.startswith("backbone.") and "mask_token" not in k
    }
    if backbone["pos_embed"] == "sincos":  # ml-aim computes it (a learned one is "absolute")
        trunk.pop("backbone.pos_embed", None)
    out, _, unknown = rename(trunk, AIM, reverse=True)
    refuse_unknown(unknown, "mimar AIM run (for aim)")
    return {k: v.detach().contiguous() for k, v in out.items()}


AIM_V1 = Format(
    name="aim",
    method="aim",
    recipe="aim/aim_600m.yaml",
    detect=detect,
    to_mimar=to_mimar,
    export=export,
)


# Format ``aim-l3m``: apple/ml-l3m @ e6376a3017293641bd39fb2dae66546f102fb75f, the official
# AIM v1 training code (``configs/aimv1/001_aim_v1_600M.yaml``): ``MetaModel`` with
# ``preprocessor`` = ``MultiBlock`` whose ``blocks.0`` is ``ViTPreprocessor`` (``patchifier``,
# a stored fixed sin-cos ``pos_embed``), ``trunk`` = ``Transformer`` (``Block``: ``norm_1``,
# ``attn`` = ``GenericAttention`` with separate ``q_proj`` / ``k_proj`` / ``v_proj`` and
# ``proj``, ``norm_2``, ``mlp.fc1`` / ``fc2``; ``post_trunk_norm``), ``head`` =
# ``SimpleDecoder`` (``decoder_projection``, fixed ``decoder_pos_embed``, ``decoder_blocks``
# of the same ``Block`` with an identity in the attention slot, ``decoder_norm``,
# ``decoder_pred``). Checkpoints: ``helpers/checkpoint.py`` (``{"model": ...}`` torch files).
L3M: Table = (
    ("preprocessor.blocks.0.patchifier.proj.{p}", "backbone.patch_embed.proj.{p}"),
    ("preprocessor.blocks.0.patchifier.norm.{p}", "backbone.patch_embed.norm.{p}"),
    ("preprocessor.blocks.0.cls_token", "backbone.cls_token"),
    ("preprocessor.blocks.0.pos_embed", "backbone.pos_embed"),
    ("trunk.blocks.{i}.norm_1.{p}", "backbone.blocks.{i}.norm1.{p}"),
    ("trunk.blocks.{i}.attn.proj.{p}", "backbone.blocks.{i}.attn.proj.{p}"),
    ("trunk.blocks.{i}.norm_2.{p}", "backbone.blocks.{i}.norm2.{p}"),
    ("trunk.blocks.{i}.mlp.fc1.{p}", "backbone.blocks.{i}.mlp.fc1.{p}"),
    ("trunk.blocks.{i}.mlp.fc2.{p}", "backbone.blocks.{i}.mlp.fc2.{p}"),
    ("trunk.post_trunk_norm.{p}", "backbone.norm.{p}"),
    ("head.decoder_projection.{p}", "head.proj.{p}"),
    ("head.decoder_blocks.{i}.norm_1.{p}", "head.blocks.{i}.norm1.{p}"),  # h += LN(h)
    ("head.decoder_blocks.{i}.norm_2.{p}", "head.blocks.{i}.norm2.{p}"),
    ("head.decoder_blocks.{i}.mlp.fc1.{p}", "head.blocks.{i}.mlp.0.{p}"),
    ("head.decoder_blocks.{i}.mlp.fc2.{p}", "head.blocks.{i}.mlp.2.{p}"),
    ("head.decoder_norm.{p}", "head.norm.{p}"),
    ("head.decoder_pred.{p}", "head.pred.{p}"),
)
_QKV = ("q_proj", "k_proj", "v_proj")
_HEAD_TABLE = "head.decoder_pos_embed"


def detect_l3m(weights: dict[str, torch.Tensor]) -> bool:
    return "preprocessor.blocks.0.patchifier.proj.weight" in weights


def l3m_to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    ignored = {}
    if _HEAD_TABLE in weights:  # fixed sin-cos (requires_grad=False): mimar computes it
        ignored[_HEAD_TABLE] = "the head's fixed sin-cos table (recomputed)"
    split = {k: v for k, v in weights.items() if k.split(".")[-2] in _QKV}
    rest = {k: v for k, v in weights.items() if k not in split and k not in ignored}
    out, keys, unknown = rename(rest, L3M)
    refuse_unknown(unknown, "aim-l3m")
    blocks = sorted({k.split(".")[2] for k in split}, key=int)
    for i, p in [(i, p) for i in blocks for p in ("weight", "bias")]:
        names = [f"trunk.blocks.{i}.attn.{n}.{p}" for n in _QKV]
        if not any(n in split for n in names):
            continue
        if not all(n in split for n in names):
            refuse_unknown([n for n in names if n in split], "aim-l3m (q, k, v incomplete)")
        target = f"backbone.blocks.{i}.attn.qkv.{p}"
        out[target] = torch.cat([split.pop(n) for n in names])  # rows q, k, v
        keys |= {n: f"{target}[{n.split('.')[-2][0]}]" for n in names}
    refuse_unknown(split, "aim-l3m")
    return Converted(out, keys, ignored, method_fields=_head_fields(out))


def _head_fields(weights: dict[str, torch.Tensor]) -> dict:
    """AIM's pretraining-head shape (``method.*``) from the head's weights."""
    proj = weights.get("head.proj.weight")
    if proj is None:
        return {}
    depth = len({k.split(".")[2] for k in weights if k.startswith("head.blocks.")})
    fields = {"head_width": int(proj.shape[0]), "head_depth": depth}
    if depth:
        fields["head_mlp_ratio"] = weights["head.blocks.0.mlp.0.weight"].shape[0] / proj.shape[0]
        fields["head_residual_norm"] = "head.blocks.0.norm1.weight" in weights
    return fields


def l3m_export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """``{"model": MetaModel state dict}`` as ml-l3m's checkpoint loader reads it (the head's
    fixed sin-cos table included, as its state dict has it)."""
    from mimar.nn import sincos_pos_embed_2d

    parts = {k: v for k, v in weights.items() if k.startswith(("backbone.", "head."))}
    fused = {k: parts.pop(k) for k in list(parts) if ".attn.qkv." in k}
    out, _, unknown = rename(parts, L3M, reverse=True)
    refuse_unknown(unknown, "mimar AIM run (for aim-l3m)")
    for key, value in fused.items():
        i, p = key.split(".")[2], key.split(".")[-1]
        for name, part in zip(_QKV, value.chunk(3), strict=True):
            out[f"trunk.blocks.{i}.attn.{name}.{p}"] = part
    if "head.proj.weight" in weights:
        grid = backbone["img_size"] // backbone["patch_size"]
        table = sincos_pos_embed_2d(weights["head.proj.weight"].shape[0], grid)
        out[_HEAD_TABLE] = table.reshape(1, grid * grid, -1).float()
    return {"model": {k: v.detach().contiguous() for k, v in out.items()}}


AIM_L3M = Format(
    name="aim-l3m",
    method="aim",
    recipe="aim/aim_600m.yaml",
    detect=detect_l3m,
    to_mimar=l3m_to_mimar,
    export=l3m_export,
)
