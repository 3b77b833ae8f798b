"""iTPN pixel releases (``itpn_base_1600e.pt``, ``itpn_large_1600e.pt``): format ``itpn``.

Names from sunsmarterjie/iTPN @ 638eff48799760e0afda68812427cf406a0e13fd, ``itpn_pixel/``:
``models/models_itpn.py`` (``iTPN``: ``patch_embed.proj`` / ``.norm``, ``absolute_pos_embed``,
one flat ``blocks`` list = ``mlp_depth`` MLP-only ``BlockWithRPE`` (``norm2``, ``mlp.fc1`` /
``fc2``; no ``norm1`` / ``attn``), a ``PatchMerge`` (``norm``, ``reduction``), ``mlp_depth`` MLP
blocks, a ``PatchMerge``, then ``depth`` attention blocks (``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp``); the FPN part ``align_dim_16tofpn`` (absent when the width
is the FPN width), ``split_16to8`` / ``split_8to4`` (``PatchSplit``: ``norm``, ``reduction``),
``align_dim_16to8`` / ``align_dim_8to4``, ``block_16to8`` / ``block_8to4`` and
``fpn_modules`` 0/1/2 applied to P16/P8/P4), ``models/models_itpn_mim.py``
(``iTPNMaskedAutoencoder``: ``decoder_embed`` 0/1/2 = ``Sequential(LayerNorm, Linear)`` of
P16/P8/P4, ``mask_token``, the fixed sin-cos ``decoder_pos_embed``, ``decoder_blocks``,
``decoder_norm``, ``decoder_pred``; ``rpe=False`` and no final norm in pretraining) and
``util/misc.py`` ``save_model`` (``{"model": state_dict, "optimizer", "epoch", "scaler",
"args"}``, ``args`` an ``argparse.Namespace``).

Import: HiViT -> ``backbone.trunk.*`` (no final norm: ``backbone.final_norm=false``, its neck
reads the raw stage-3 tokens as the official one), the neck -> ``backbone.neck.*`` (mimar keeps
the levels finest first, P4/P8/P16: the official index l of ``fpn_modules`` and
``decoder_embed`` is mimar's 2 - l), the decoder -> ``decoder.*`` and ``decoder_pred`` ->
``pixel_head``: the released pixel pretraining state whole. MFM was never released
(docs/METHODS.md §4.7): its heads start fresh and its EMA teacher starts as a copy of the
imported backbone + neck, as the method starts it. The CLIP variant (``itpn_clip``: LayerScale,
relative position tables, ``lm_head``) is another model and is refused by its keys.
"""

from __future__ import annotations

import math
import re

import torch

from mimar.errors import CheckpointError
from mimar.formats.family import Converted, Format
from mimar.formats.keymap import Table, check_fixed_sincos, refuse_unknown, rename
from mimar.nn import sincos_pos_embed_2d

# official name (the flat ``blocks`` list split by _by_stage) -> mimar method name
ITPN: Table = (
    ("patch_embed.proj.{p}", "backbone.trunk.patch_embed.proj.{p}"),
    ("patch_embed.norm.{p}", "backbone.trunk.patch_embed.norm.{p}"),
    ("absolute_pos_embed", "backbone.trunk.pos_embed"),
    ("stage1.{i}.norm2.{p}", "backbone.trunk.stage1.{i}.norm.{p}"),
    ("stage1.{i}.mlp.fc1.{p}", "backbone.trunk.stage1.{i}.mlp.fc1.{p}"),
    ("stage1.{i}.mlp.fc2.{p}", "backbone.trunk.stage1.{i}.mlp.fc2.{p}"),
    ("merge1.norm.{p}", "backbone.trunk.merge1.norm.{p}"),
    ("merge1.reduction.weight", "backbone.trunk.merge1.reduction.weight"),
    ("stage2.{i}.norm2.{p}", "backbone.trunk.stage2.{i}.norm.{p}"),
    ("stage2.{i}.mlp.fc1.{p}", "backbone.trunk.stage2.{i}.mlp.fc1.{p}"),
    ("stage2.{i}.mlp.fc2.{p}", "backbone.trunk.stage2.{i}.mlp.fc2.{p}"),
    ("merge2.norm.{p}", "backbone.trunk.merge2.norm.{p}"),
    ("merge2.reduction.weight", "backbone.trunk.merge2.reduction.weight"),
    ("main.{i}.norm1.{p}", "backbone.trunk.blocks.{i}.norm1.{p}"),
    ("main.{i}.attn.qkv.{p}", "backbone.trunk.blocks.{i}.attn.qkv.{p}"),
    ("main.{i}.attn.proj.{p}", "backbone.trunk.blocks.{i}.attn.proj.{p}"),
    ("main.{i}.norm2.{p}", "backbone.trunk.blocks.{i}.norm2.{p}"),
    ("main.{i}.mlp.fc1.{p}", "backbone.trunk.blocks.{i}.mlp.fc1.{p}"),
    ("main.{i}.mlp.fc2.{p}", "backbone.trunk.blocks.{i}.mlp.fc2.{p}"),
    # the neck
    ("align_dim_16tofpn.{p}", "backbone.neck.reduce16.{p}"),
    ("split_16to8.norm.{p}", "backbone.neck.split16.norm.{p}"),
    ("split_16to8.reduction.weight", "backbone.neck.split16.reduction.weight"),
    ("align_dim_16to8.weight", "backbone.neck.lateral8.weight"),
    ("block_16to8.{i}.norm2.{p}", "backbone.neck.blocks8.{i}.norm.{p}"),
    ("block_16to8.{i}.mlp.fc1.{p}", "backbone.neck.blocks8.{i}.mlp.fc1.{p}"),
    ("block_16to8.{i}.mlp.fc2.{p}", "backbone.neck.blocks8.{i}.mlp.fc2.{p}"),
    ("split_8to4.norm.{p}", "backbone.neck.split8.norm.{p}"),
    ("split_8to4.reduction.weight", "backbone.neck.split8.reduction.weight"),
    ("align_dim_8to4.weight", "backbone.neck.lateral4.weight"),
    ("block_8to4.{i}.norm2.{p}", "backbone.neck.blocks4.{i}.norm.{p}"),
    ("block_8to4.{i}.mlp.fc1.{p}", "backbone.neck.blocks4.{i}.mlp.fc1.{p}"),
    ("block_8to4.{i}.mlp.fc2.{p}", "backbone.neck.blocks4.{i}.mlp.fc2.{p}"),
    # official level order P16, P8, P4 -> mimar's P4, P8, P16
    ("fpn_modules.0.norm2.{p}", "backbone.neck.out_blocks.2.0.norm.{p}"),
    ("fpn_modules.0.mlp.fc1.{p}", "backbone.neck.out_blocks.2.0.mlp.fc1.{p}"),
    ("fpn_modules.0.mlp.fc2.{p}", "backbone.neck.out_blocks.2.0.mlp.fc2.{p}"),
    ("fpn_modules.1.norm2.{p}", "backbone.neck.out_blocks.1.0.norm.{p}"),
    ("fpn_modules.1.mlp.fc1.{p}", "backbone.neck.out_blocks.1.0.mlp.fc1.{p}"),
    ("fpn_modules.1.mlp.fc2.{p}", "backbone.neck.out_blocks.1.0.mlp.fc2.{p}"),
    ("fpn_modules.2.norm2.{p}", "backbone.neck.out_blocks.0.0.norm.{p}"),
    ("fpn_modules.2.mlp.fc1.{p}", "backbone.neck.out_blocks.0.0.mlp.fc1.{p}"),
    ("fpn_modules.2.mlp.fc2.{p}", "backbone.neck.out_blocks.0.0.mlp.fc2.{p}"),
    # the pixel decoder
    ("decoder_embed.0.0.{p}", "decoder.embed.levels.2.0.{p}"),
    ("decoder_embed.0.1.{p}", "decoder.embed.levels.2.1.{p}"),
    ("decoder_embed.1.0.{p}", "decoder.embed.levels.1.0.{p}"),
    ("decoder_embed.1.1.{p}", "decoder.embed.levels.1.1.{p}"),
    ("decoder_embed.2.0.{p}", "decoder.embed.levels.0.0.{p}"),
    ("decoder_embed.2.1.{p}", "decoder.embed.levels.0.1.{p}"),
    ("mask_token", "decoder.mask_token"),
    ("decoder_blocks.{i}.norm1.{p}", "decoder.blocks.{i}.norm1.{p}"),
    ("decoder_blocks.{i}.attn.qkv.{p}", "decoder.blocks.{i}.attn.qkv.{p}"),
    ("decoder_blocks.{i}.attn.proj.{p}", "decoder.blocks.{i}.attn.proj.{p}"),
    ("decoder_blocks.{i}.norm2.{p}", "decoder.blocks.{i}.norm2.{p}"),
    ("decoder_blocks.{i}.mlp.fc1.{p}", "decoder.blocks.{i}.mlp.fc1.{p}"),
    ("decoder_blocks.{i}.mlp.fc2.{p}", "decoder.blocks.{i}.mlp.fc2.{p}"),
    ("decoder_norm.{p}", "decoder.norm.{p}"),
    ("decoder_pred.{p}", "pixel_head.{p}"),
)
_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")
_STAGED = re.compile(r"(stage1|stage2|main)\.(\d+)\.(.*)|(merge1|merge2)\.(.*)")
_DERIVED = {
    "decoder_pos_embed": "fixed sin-cos table (recomputed from the grid)",
    "relative_position_index": "derived buffer (recomputed from the grid)",
}


def detect(weights: dict[str, torch.Tensor]) -> bool:
    # old timm / Microsoft Swins with ape=True have an absolute_pos_embed too (format timm)
    if "layers.0.blocks.0.attn.qkv.weight" in weights:
        return False
    return "split_16to8.reduction.weight" in weights or "absolute_pos_embed" in weights


def _mlp_depth(weights: dict[str, torch.Tensor]) -> int:
    """The index of the first PatchMerge in the flat ``blocks`` list = MLP blocks per stage."""
    merges = sorted(
        int(m.group(1))
        for k in weights
        if (m := _BLOCK.fullmatch(k)) and m.group(2) == "reduction.weight"
    )
    if len(merges) != 2 or merges[1] != 2 * merges[0] + 1:
        raise CheckpointError(
            "itpn: the blocks list holds no two PatchMerge layers (blocks.{i}.reduction.weight) "
            "after equal MLP stages: not an iTPN HiViT"
        )
    return merges[0]


def _by_stage(key: str, m: int) -> str:
    """Official ``blocks.{k}.*`` -> ``stage1.{k}`` / ``merge1`` / ``stage2.{..}`` / ``merge2`` /
    ``main.{..}`` (``m`` MLP blocks per stage); other keys unchanged."""
    match = _BLOCK.fullmatch(key)
    if match is None:
        return key
    k, rest = int(match.group(1)), match.group(2)
    if k < m:
        return f"stage1.{k}.{rest}"
    if k == m:
        return f"merge1.{rest}"
    if k <= 2 * m:
        return f"stage2.{k - m - 1}.{rest}"
    if k == 2 * m + 1:
        return f"merge2.{rest}"
    return f"main.{k - 2 * m - 2}.{rest}"


def _flat(key: str, m: int) -> str:
    """The inverse of :func:`_by_stage`."""
    match = _STAGED.fullmatch(key)
    if match is None:
        return key
    stage, k, rest, merge, merge_rest = match.groups()
    if merge:
        return f"blocks.{m if merge == 'merge1' else 2 * m + 1}.{merge_rest}"
    offset = {"stage1": 0, "stage2": m + 1, "main": 2 * m + 2}[stage]
    return f"blocks.{offset + int(k)}.{rest}"


def to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    ignored = {k: why for k, why in ((k, _derived(k)) for k in weights) if why}
    check_fixed_sincos(weights, "decoder_pos_embed", 0, "itpn")
    m = _mlp_depth(weights)
    staged = {_by_stage(k, m): k for k in weights if k not in ignored}
    out, keys, unknown = rename({new: weights[old] for new, old in staged.items()}, ITPN)
    refuse_unknown([staged[k] for k in unknown], "itpn (pixel pretraining)")
    return Converted(
        out, {staged[k]: v for k, v in keys.items()}, ignored, method_fields=_method_fields(out)
    )


def _derived(key: str) -> str | None:
    return next((why for name, why in _DERIVED.items() if key.endswith(name)), None)


def _method_fields(out: dict[str, torch.Tensor]) -> dict:
    """``method.*`` the weights tell: FPN width and depth, decoder width and depth."""
    fields = {}
    if (split := out.get("backbone.neck.split16.reduction.weight")) is not None:
        fields["fpn_dim"] = int(split.shape[0]) // 4
    fields["fpn_depth"] = _count(out, "backbone.neck.blocks8.")
    if (token := out.get("decoder.mask_token")) is not None:
        fields["decoder_dim"] = int(token.shape[-1])
    fields["decoder_depth"] = _count(out, "decoder.blocks.")
    return fields


def _count(weights: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix) :].split(".")[0] for k in weights if k.startswith(prefix)})


def hivit_fields(weights: dict[str, torch.Tensor], recipe: dict) -> dict:
    """HiViT's shape from its weights (``backbone.`` removed): stem width (D/4), inner patch
    (p/4), stages, MLP widths, qkv bias, final norm, the position table's grid."""
    proj = weights.get("trunk.patch_embed.proj.weight")  # (D/4, C, p/4, p/4)
    if proj is None:
        raise CheckpointError("no patch_embed.proj.weight in the weights: not an iTPN HiViT")
    quarter, in_chans, inner, _ = proj.shape
    fields = {
        "name": "hivit",
        "embed_dim": 4 * int(quarter),
        "in_chans": int(in_chans),
        "patch_size": 4 * int(inner),
        "mlp_depth": _count(weights, "trunk.stage1."),
        "depth": _count(weights, "trunk.blocks."),
        "bridge_mlp_ratio": weights["trunk.stage1.0.mlp.fc1.weight"].shape[0] / quarter,
        "mlp_ratio": weights["trunk.blocks.0.mlp.fc1.weight"].shape[0] / (4 * quarter),
        "qkv_bias": "trunk.blocks.0.attn.qkv.bias" in weights,
        "final_norm": "trunk.norm.weight" in weights,
    }
    if (table := weights.get("trunk.pos_embed")) is not None:
        side = math.isqrt(table.shape[1])
        if side * side != table.shape[1]:
            raise CheckpointError(f"absolute_pos_embed of shape {tuple(table.shape)} is not square")
        fields["img_size"] = side * fields["patch_size"]
    return fields


def export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """``{"model": official state dict}`` of ``iTPNMaskedAutoencoder``, as ``save_model``
    writes it, the fixed ``decoder_pos_embed`` included (the official model has it in its
    state dict). MFM's heads and EMA teacher have no official counterpart and are left out."""
    if backbone.get("final_norm"):
        # sunsmarterjie/iTPN @ 638eff48 itpn_pixel/models/models_itpn_mim.py: the pretraining
        # iTPNMaskedAutoencoder has no encoder norm (its neck takes the raw last-stage tokens)
        raise CheckpointError(
            "--format itpn: this run's HiViT has a final norm (backbone.final_norm=true, the "
            "default of mimar's iTPN recipes) and the official pretraining model has none, so "
            "no official file can hold it: pretrain with backbone.final_norm=false added to "
            "the command line (an imported itpn release already has it), then export that run"
        )
    parts = {
        k: v for k, v in weights.items() if k.startswith(("backbone.", "decoder.", "pixel_head."))
    }
    out, _, unknown = rename(parts, ITPN, reverse=True)
    refuse_unknown(unknown, "mimar iTPN run (for itpn)")
    m = int(backbone["mlp_depth"])
    official = {_flat(k, m): v.detach().contiguous() for k, v in out.items()}
    dim = int(weights["decoder.mask_token"].shape[-1])
    grid = int(backbone["img_size"]) // int(backbone["patch_size"])
    official["decoder_pos_embed"] = sincos_pos_embed_2d(dim, grid)[None].float()
    return {"model": official}


ITPN_PIXEL = Format(
    name="itpn",
    method="itpn",
    recipe="itpn/hivit_base_in1k.yaml",
    detect=detect,
    to_mimar=to_mimar,
    export=export,
    architecture=hivit_fields,
)
