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
