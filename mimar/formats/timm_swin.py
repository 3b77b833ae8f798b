"""timm Swin weights (``swin_base_patch4_window7_224``): the Swin half of format ``timm``.

mimar's Swin holds timm's own ``SwinTransformer`` as ``model``, so the names map one to one
under ``backbone.model.*`` (timm 1.0.31 ``timm/models/swin_transformer.py``). Two layouts of
the same weights exist, and both are read exactly:

* timm >= 0.9: the patch merging *opens* stage s >= 1 (``layers.{s}.downsample``); the
  classifier is ``head.fc.*``; ``relative_position_index`` and ``attn_mask`` are
  non-persistent buffers, absent from the weights.
* timm < 0.9 and Microsoft's Swin (the layout SimMIM's encoder has, see ``simmim.py``): the
  merging *closes* stage s < last (``layers.{s}.downsample``; so stage 0 has one); the
  classifier is ``head.*``; both index buffers are saved. Told apart as timm's own
  ``checkpoint_filter_fn`` does: ``layers.0.downsample`` exists only there. The merging's
  weights and channel order are the same in both (x0, x1, x2, x3 = even/odd rows x
  even/odd columns, column-major), so only its stage index moves.

Refused: an absolute position embedding (``absolute_pos_embed``, ``ape=True``), which
mimar's Swin does not have. Export writes timm >= 0.9's layout, which timm 1.0 loads with
``strict=True``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mimar.config import to_dict
from mimar.errors import CheckpointError, ConfigError
from mimar.formats.family import Converted
from mimar.formats.keymap import Table, refuse_unknown, rename

_B = "layers.{i}.blocks.{j}."
_NAMES = (  # timm's names (>= 0.9); mimar's are the same under backbone.model.
    "patch_embed.proj.{p}",
    "patch_embed.norm.{p}",
    *(_B + part for part in ("norm1.{p}", "attn.relative_position_bias_table", "attn.qkv.{p}")),
    *(_B + part for part in ("attn.proj.{p}", "norm2.{p}", "mlp.fc1.{p}", "mlp.fc2.{p}")),
    "layers.{i}.downsample.reduction.weight",
    "layers.{i}.downsample.norm.{p}",
    "norm.{p}",
)
SWIN: Table = tuple((name, "backbone.model." + name) for name in _NAMES)
_DERIVED = ("relative_position_index", "attn_mask")
_MERGING = re.compile(r"^layers\.(\d+)\.downsample\.")
TIMM_SWIN_MODEL = "swin_tiny_patch4_window7_224"  # any swin_* name: the kwargs set the shape
SWIN_NORM_EPS = 1e-5  # nn.LayerNorm's default, which timm's Swin (and so mimar's) keeps


def is_swin(weights: dict[str, torch.Tensor]) -> bool:
    return "layers.0.blocks.0.attn.qkv.weight" in weights


def to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    if hit := next((k for k in weights if "absolute_pos_embed" in k), None):
        raise CheckpointError(
            f"this timm Swin has an absolute position embedding ({hit}, ape=True): mimar's "
            "Swin has none"
        )
    ignored = {k: "derived buffer (recomputed)" for k in weights if k.endswith(_DERIVED)}
    ignored |= {
        k: "the classifier (not part of the pretrained backbone)"
        for k in weights
        if k.startswith("head.")
    }
    # timm < 0.9 / Microsoft: the merging closing stage s is timm >= 0.9's opening stage s + 1
    old = "layers.0.downsample.reduction.weight" in weights
    current = {
        (_MERGING.sub(lambda m: f"layers.{int(m[1]) + 1}.downsample.", k) if old else k): k
        for k in weights
        if k not in ignored
    }
    out, keys, unknown = rename({new: weights[k] for new, k in current.items()}, SWIN)
    refuse_unknown([current[k] for k in unknown], "timm (Swin)")
    return Converted(out, {current[k]: v for k, v in keys.items()}, ignored)


def export_timm(backbone: nn.Module, classifier: nn.Module | None = None) -> tuple[dict, dict]:
    """A mimar Swin (or a fine-tuned classifier on one) -> timm >= 0.9's weights and the
    ``FILE.json`` metadata of ``mimar export --format timm`` (:mod:`mimar.export`)."""
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    out, _, unknown = rename(state, SWIN, reverse=True)
    refuse_unknown([k for k in unknown if k != "backbone.mask_token"], "mimar Swin (for timm)")
    weights = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    kwargs = export_kwargs(backbone.cfg)
    if classifier is not None:  # mean of the normed tokens -> head: timm's avg ClassifierHead
        if classifier.pool != "avg" or not isinstance(classifier.fc_norm, nn.Identity):
            raise ConfigError("--format timm: a Swin classifier exports with avg pooling only")
        kwargs |= {"num_classes": classifier.num_classes, "global_pool": "avg"}
        for key, value in classifier.head.state_dict().items():
            weights[f"head.fc.{key}"] = value.detach().contiguous().cpu()
    meta = {
        "timm_model": TIMM_SWIN_MODEL,
        "kwargs": kwargs,
        "norm_eps": SWIN_NORM_EPS,
        "mimar_backbone": to_dict(backbone.cfg),
    }
    return weights, meta


def export_kwargs(cfg) -> dict:
    """kwargs for ``timm.create_model(TIMM_SWIN_MODEL, num_classes=0, **kwargs)`` building
    the same ``SwinTransformer`` that mimar's Swin of config ``cfg`` holds."""
    return {
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "in_chans": cfg.in_chans,
        "embed_dim": cfg.embed_dim,
        "depths": list(cfg.depths),
        "num_heads": list(cfg.num_heads),
        "window_size": cfg.window_size,
        "mlp_ratio": cfg.mlp_ratio,
        "qkv_bias": cfg.qkv_bias,
    }
