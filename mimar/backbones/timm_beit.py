"""mimar ViT <-> timm ``Beit`` weight names, for a ViT with a relative position bias.

timm's ``VisionTransformer`` has no relative position bias, so such a ViT (SimMIM's) exports
to timm's ``Beit`` (``timm/models/beit.py``), whose names differ from ours in four places:

* ``blocks.{i}.attn.qkv.bias`` (q, k, v) -> ``blocks.{i}.attn.q_bias`` and ``.v_bias``;
* ``blocks.{i}.ls1.gamma`` / ``ls2.gamma`` -> ``blocks.{i}.gamma_1`` / ``gamma_2``;
* ``blocks.{i}.attn.rel_pos_bias.relative_position_bias_table`` (per block) ->
  ``blocks.{i}.attn.relative_position_bias_table``;
* no ``attn.proj`` / ``mlp`` biases (``proj_bias=False``) -> zero biases (Beit always has them).

``rel_pos_bias.relative_position_bias_table`` (shared), ``patch_embed``, ``cls_token``,
``pos_embed``, ``norm*``, ``attn.qkv.weight``, ``attn.proj``, ``mlp.fc*`` are the same.
Beit has no k bias: ``q . (k + b) = q . k + q . b`` adds the same value to all logits of a
query, which the softmax cancels, so dropping our k bias changes no output (BEiT and SimMIM
fix it at zero; ours starts at zero and gets no gradient).
"""

from __future__ import annotations

import re

import torch

_BLOCK = re.compile(r"blocks\.(\d+)\.")


def to_beit(state_dict: dict[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """Our ViT's weights (width ``dim``) under timm ``Beit``'s names."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("attn.qkv.bias"):
            stem = key.removesuffix("qkv.bias")
            out[stem + "q_bias"], out[stem + "v_bias"] = value[:dim], value[2 * dim :]
        elif key.endswith((".ls1.gamma", ".ls2.gamma")):
            out[key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")] = value
        elif key.endswith("attn.rel_pos_bias.relative_position_bias_table"):
            out[key.replace("attn.rel_pos_bias.", "attn.")] = value
        else:
            out[key] = value
    for key, value in state_dict.items():  # Beit always has these biases: add zeros
        for name in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            if key.endswith(f"{name}.weight") and key.replace("weight", "bias") not in out:
                out[key.replace("weight", "bias")] = value.new_zeros(value.shape[0])
    return out


def from_beit(
    state_dict: dict[str, torch.Tensor], prefix: str = "", proj_bias: bool = True
) -> None:
    """Rename, in place, timm ``Beit`` weights under ``prefix`` to our ViT's names (the k bias
    becomes zero; all-zero biases are dropped when our ViT has ``proj_bias=False``). Keys that
    are already ours are left alone, so the ViT can load either layout."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        name = key[len(prefix) :]
        if name.endswith("attn.q_bias"):
            q = state_dict.pop(key)
            v = state_dict.pop(key.replace("q_bias", "v_bias"))
            state_dict[key.replace("q_bias", "qkv.bias")] = torch.cat([q, torch.zeros_like(q), v])
        elif _BLOCK.match(name) and name.endswith((".gamma_1", ".gamma_2")):
            new = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
            state_dict[new] = state_dict.pop(key)
        elif _BLOCK.match(name) and name.endswith("attn.relative_position_bias_table"):
            new = key.replace("attn.relative_position_bias_table", "attn.rel_pos_bias.")
            state_dict[new + "relative_position_bias_table"] = state_dict.pop(key)
        elif name.endswith("relative_position_index"):
            state_dict.pop(key)  # timm checkpoints may hold the (recomputed) index buffer
        elif not proj_bias and name.endswith(("attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias")):
            if not state_dict[key].any():
                state_dict.pop(key)
