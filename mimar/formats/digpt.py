"""D-iGPT releases (``digpt_base.pth``): format ``digpt``.

Names from OliverRensu/D-iGPT @ 765e8f5256d3feb6fa00bf48850bd6f96dd31346, ``DiGPT_torch/``:
``models_digpt.py`` (``DiGPT``: ``patch_embed.proj``, the fixed sin-cos ``pos_embed`` with a
class-token row, ``blocks``, ``cls_token``; per decoder path -- ``ar_`` the generative one,
``kd_`` the discriminative one -- ``{ar,kd}_enc_norm`` (one LayerNorm repeated four times in a
``ModuleList``, so the state dict holds four equal copies), ``{ar,kd}_enc2dec``,
``{ar,kd}_token``, ``{ar,kd}_blocks``, ``{ar,kd}_norm``, ``{ar,kd}_pred``; the fixed sin-cos
``decoder_pos_embed`` and the attention ``mask`` buffer), ``vit.py`` (``Block``: ``norm1``,
``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1`` / ``fc2``; ``DecoderBlock``: ``norm1``,
``attn1`` (self), ``norm2_1`` (queries) / ``norm2_2`` (memory), ``attn2`` (cross: ``q``,
``kv``, ``proj``), ``norm2``, ``mlp``) and ``util/misc.py`` ``save_model`` (``{"model":
state_dict, "optimizer", "epoch", "scaler", "args"}``).

Import: the ViT -> ``backbone.*`` (no final norm, as the code), the generative path ->
``gen_decoder.*`` and the discriminative one -> ``dis_decoder.*``: D-iGPT's whole pretraining
state. The teacher (OpenCLIP ViT-H/14) is never in the release: the run keeps the recipe's
``teacher.*``; its width is read from the prediction heads.
"""

from __future__ import annotations

import torch

from mimar.errors import CheckpointError
from mimar.formats.family import Converted, Format
from mimar.formats.keymap import Table, check_fixed_sincos, refuse_unknown, rename
from mimar.nn import sincos_pos_embed_2d

ENCODER: Table = (
    ("patch_embed.proj.{p}", "backbone.patch_embed.proj.{p}"),
    ("cls_token", "backbone.cls_token"),
    ("pos_embed", "backbone.pos_embed"),
    ("blocks.{i}.norm1.{p}", "backbone.blocks.{i}.norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "backbone.blocks.{i}.attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "backbone.blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.norm2.{p}", "backbone.blocks.{i}.norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", "backbone.blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", "backbone.blocks.{i}.mlp.fc2.{p}"),
)
# one decoder path: official (prefix "ar_" / "kd_" -> "{x}_") -> mimar (gen_ / dis_decoder)
DECODER: Table = (
    ("{x}_enc_norm.0.{p}", "{d}.memory_norm.{p}"),
    ("{x}_enc2dec.{p}", "{d}.memory_proj.{p}"),
    ("{x}_token", "{d}.query_token"),
    ("{x}_blocks.{i}.norm1.{p}", "{d}.blocks.{i}.norm1.{p}"),
    ("{x}_blocks.{i}.attn1.qkv.{p}", "{d}.blocks.{i}.attn.qkv.{p}"),
    ("{x}_blocks.{i}.attn1.proj.{p}", "{d}.blocks.{i}.attn.proj.{p}"),
    ("{x}_blocks.{i}.norm2_1.{p}", "{d}.blocks.{i}.norm2_q.{p}"),
    ("{x}_blocks.{i}.norm2_2.{p}", "{d}.blocks.{i}.norm2_kv.{p}"),
    ("{x}_blocks.{i}.attn2.q.{p}", "{d}.blocks.{i}.cross_attn.q.{p}"),
    ("{x}_blocks.{i}.attn2.kv.{p}", "{d}.blocks.{i}.cross_attn.kv.{p}"),
    ("{x}_blocks.{i}.attn2.proj.{p}", "{d}.blocks.{i}.cross_attn.proj.{p}"),
    ("{x}_blocks.{i}.norm2.{p}", "{d}.blocks.{i}.norm3.{p}"),
    ("{x}_blocks.{i}.mlp.fc1.{p}", "{d}.blocks.{i}.mlp.fc1.{p}"),
    ("{x}_blocks.{i}.mlp.fc2.{p}", "{d}.blocks.{i}.mlp.fc2.{p}"),
    ("{x}_norm.{p}", "{d}.norm.{p}"),
    ("{x}_pred.{p}", "{d}.head.{p}"),
)
PATHS = {"ar": "gen_decoder", "kd": "dis_decoder"}  # generative, discriminative
DIGPT: Table = ENCODER + tuple(
    (a.replace("{x}", x), b.replace("{d}", d)) for x, d in PATHS.items() for a, b in DECODER
)
_DERIVED = {
    "decoder_pos_embed": "fixed sin-cos table (recomputed from the grid)",
    "mask": "derived buffer (the cluster-causal attention mask, recomputed)",
}


def detect(weights: dict[str, torch.Tensor]) -> bool:
    return "ar_enc2dec.weight" in weights or "kd_enc2dec.weight" in weights


def to_mimar(weights: dict[str, torch.Tensor], extra: dict) -> Converted:
    ignored = {k: why for k, why in _DERIVED.items() if k in weights}
    check_fixed_sincos(weights, "decoder_pos_embed", 1, "digpt")
    ignored |= _repeated_norms(weights)
    rest = {k: v for k, v in weights.items() if k not in ignored}
    out, keys, unknown = rename(rest, DIGPT)
    refuse_unknown(unknown, "digpt")
    head = out.get("gen_decoder.head.weight", out.get("dis_decoder.head.weight"))
    dim = int(head.shape[0]) if head is not None else None
    return Converted(out, keys, ignored, method_fields=_method_fields(out), teacher_dim=dim)


def _repeated_norms(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{ar,kd}_enc_norm.{1,2,3}``: the same module as ``.0`` (``[nn.LayerNorm(D)] * 4``), so
    equal to it; a release where they differ is not the official model."""
    ignored = {}
    for path in PATHS:
        for key, value in weights.items():
            head, _, tail = key.partition(f"{path}_enc_norm.")
            if head or not tail or tail.startswith("0."):
                continue
            first = weights.get(f"{path}_enc_norm.0.{tail.partition('.')[2]}")
            if first is None or not torch.equal(first, value):
                raise CheckpointError(
                    f"digpt: {key} differs from {path}_enc_norm.0 (the official model repeats one "
                    "LayerNorm for every memory layer)"
                )
            ignored[key] = f"the same module as {path}_enc_norm.0"
    return ignored


def _method_fields(out: dict[str, torch.Tensor]) -> dict:
    """``method.*`` the weights tell: decoder width, depth and MLP ratio, whether the
    discriminative decoder is there, and how many encoder layers feed the memory."""
    proj = out.get("gen_decoder.memory_proj.weight")
    if proj is None:
        raise CheckpointError("digpt: no ar_enc2dec.weight (the generative decoder's memory)")
    width = out["backbone.patch_embed.proj.weight"].shape[0]
    depth = len({k.split(".")[2] for k in out if k.startswith("gen_decoder.blocks.")})
    dim = int(out["gen_decoder.query_token"].shape[-1])
    fc1 = out["gen_decoder.blocks.0.mlp.fc1.weight"]
    fields = {
        "decoder_dim": dim,
        "decoder_depth": depth,
        "decoder_mlp_ratio": fc1.shape[0] / dim,
        "dis_decoder": "dis_decoder.memory_proj.weight" in out,
    }
    # the weights tell how many blocks feed the memory, not which: the code's 6/8/10/12 of 12
    # (its spread at other depths) when the count fits, else the recipe's or the override's
    from mimar.methods.digpt import default_memory_layers

    blocks = len({k.split(".")[2] for k in out if k.startswith("backbone.blocks.")})
    spread = default_memory_layers(blocks)
    if len(spread) * width == proj.shape[1]:
        fields["memory_layers"] = list(spread)
    return fields


def export(weights: dict[str, torch.Tensor], backbone: dict) -> dict:
    """``{"model": official state dict}``, as ``save_model`` writes it: the fixed
    ``decoder_pos_embed`` and every repeated ``{ar,kd}_enc_norm.{l}`` included; the ``mask``
    buffer, hard-coded to the official geometry, is left out (load with ``strict=False``)."""
    if backbone.get("final_norm"):
        raise CheckpointError(
            "--format digpt: the official encoder has no final norm; this run has one "
            "(backbone.final_norm=true)"
        )
    parts = {
        k: v
        for k, v in weights.items()
        if k.startswith(("backbone.", "gen_decoder.", "dis_decoder."))
    }
    out, _, unknown = rename(parts, DIGPT, reverse=True)
    refuse_unknown(unknown, "mimar D-iGPT run (for digpt)")
    memory = (
        weights["gen_decoder.memory_proj.weight"].shape[1]
        // weights["backbone.patch_embed.proj.weight"].shape[0]
    )
    for path in PATHS:
        for p in ("weight", "bias"):
            if (first := out.get(f"{path}_enc_norm.0.{p}")) is not None:
                for layer in range(1, int(memory)):
                    out[f"{path}_enc_norm.{layer}.{p}"] = first
    dim = int(weights["gen_decoder.query_token"].shape[-1])
    grid = int(backbone["img_size"]) // int(backbone["patch_size"])
    table = sincos_pos_embed_2d(dim, grid).float()
    out["decoder_pos_embed"] = torch.cat([table.new_zeros(1, dim), table])[None]
    return {"model": {k: v.detach().contiguous() for k, v in out.items()}}


DIGPT_VIT = Format(
    name="digpt",
    method="digpt",
    recipe="digpt/vit_base_clip_in1k.yaml",
    detect=detect,
    to_mimar=to_mimar,
    export=export,
)
