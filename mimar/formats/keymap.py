"""Key maps between a release's weight names and mimar's, and the wrappers releases use.

A family module writes its map as a table of template pairs, ``("encoder.blocks.{i}.norm1.{p}",
"backbone.blocks.{i}.norm1.{p}")``: ``{i}`` is a block (or stage) index, ``{p}`` ``weight`` or
``bias``. The same table renames both ways (import and export), so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from mimar.errors import CheckpointError

Table = tuple[tuple[str, str], ...]

_FIELDS = {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>weight|bias)"}
# What a release's top level holds besides its weights: training state, never imported
WRAPPERS = ("model", "state_dict", "module", "model_state")
PREFIXES = ("module.", "model.", "encoder.", "backbone.")


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, field, ...
    pattern = "".join(_FIELDS[p] if k % 2 else re.escape(p) for k, p in enumerate(parts))
    return re.compile(pattern + "$")


def rename(
    weights: dict[str, torch.Tensor], table: Table, reverse: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Rename ``weights`` by ``table`` (left -> right; ``reverse``: right -> left).

    Returns the renamed weights, ``{old name: new name}`` and the names no row matched.
    """
    rows = [(_regex(b), a) if reverse else (_regex(a), b) for a, b in table]
    out, names, unmatched = {}, {}, []
    for key, value in weights.items():
        for pattern, target in rows:
            if match := pattern.match(key):
                new = target.format(**match.groupdict())
                out[new], names[key] = value, new
                break
        else:
            unmatched.append(key)
    return out, names, unmatched


def unwrap(obj: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The weights of a release's top-level object and what else it held.

    ``{"model": ...}`` / ``{"state_dict": ...}`` / ``{"module": ...}`` wrappers are opened
    (their siblings -- optimizer, schedule, epoch, config -- are returned as "other"), then a
    prefix that *every* key has (``module.`` from DDP, ``model.``, ``encoder.``, ``backbone.``)
    is removed. A value that is not a tensor is an error naming its key.
    """
    other: list[str] = []
    while isinstance(obj, dict):
        inner = next((w for w in WRAPPERS if isinstance(obj.get(w), dict)), None)
        if inner is None:
            break
        other += [str(k) for k in obj if k != inner]
        obj = obj[inner]
    weights = {k: v for k, v in obj.items() if k != "hf_config"}
    bad = [str(k) for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"the weights hold non-tensor values under {', '.join(bad[:5])}: not a state dict"
        )
    changed = True
    while changed and weights:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in weights):
                weights = {k[len(prefix) :]: v for k, v in weights.items()}
                changed = True
    return weights, other


def refuse_unknown(keys: Iterable[str], fmt: str) -> None:
    """One error line naming the keys that are neither mapped nor known to be irrelevant."""
    keys = sorted(keys)
    if keys:
        shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        raise CheckpointError(
            f"{len(keys)} key(s) of this {fmt} checkpoint are neither mapped nor known to be "
            f"irrelevant: {shown}"
        )


def merge_qv_biases(
    weights: dict[str, torch.Tensor], target_of: Callable[[str], str], fmt: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """BEiT-style ``{stem}q_bias`` / ``{stem}v_bias`` pairs -> mimar's fused ``qkv.bias``
    ``(3D,)`` with a zero k bias (which the softmax cannot see); ``target_of(stem)`` names the
    fused key. Returns the fused biases and ``{release name: mimar name[q|v]}``."""
    out, keys = {}, {}
    for key, q in weights.items():
        if not key.endswith("q_bias"):
            continue
        stem = key.removesuffix("q_bias")
        if stem + "v_bias" not in weights:
            refuse_unknown([key], f"{fmt} (a q_bias without its v_bias)")
        target = target_of(stem)
        out[target] = torch.cat([q, torch.zeros_like(q), weights[stem + "v_bias"]])
        keys[key], keys[stem + "v_bias"] = f"{target}[q]", f"{target}[v]"
    lone = [k for k in weights if k.endswith("v_bias") and k not in keys]
    refuse_unknown(lone, f"{fmt} (a v_bias without its q_bias)")
    return out, keys


def split_qkv_bias(bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mimar's fused ``(3D,)`` qkv bias -> BEiT's q and v biases (the k bias is dropped: the
    softmax is invariant to it)."""
    dim = bias.shape[0] // 3
    return bias[:dim], bias[2 * dim :]


def ema_copies(
    weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], teacher: str = "ema."
) -> dict[str, torch.Tensor]:
    """A method's EMA teacher (``ema.*``, iTPN's MFM) that a release lacks, as a copy of the
    release's ``backbone.*``: the method starts its teacher as a copy of the student, and a
    random teacher would make continued pretraining chase noise."""
    return {
        key: weights["backbone." + key[len(teacher) :]].clone()
        for key in target
        if key.startswith(teacher)
        and key not in weights
        and "backbone." + key[len(teacher) :] in weights
    }


def check_fixed_sincos(
    weights: dict[str, torch.Tensor], key: str, prefix_rows: int, fmt: str
) -> None:
    """A release's fixed sin-cos table that mimar recomputes instead of importing (a decoder's
    ``decoder_pos_embed``) must be that table: one line if it is not (it was trained)."""
    from mimar.nn import sincos_pos_embed_2d

    if (table := weights.get(key)) is None:
        return
    n = table.shape[1] - prefix_rows
    side = int(round(n**0.5))
    want = sincos_pos_embed_2d(table.shape[-1], side) if side * side == n else None
    if want is None or not torch.allclose(table[0, prefix_rows:].float(), want, atol=1e-4):
        raise CheckpointError(
            f"{fmt}: {key} of shape {tuple(table.shape)} is not the fixed 2-D sin-cos table "
            "the official code builds (and mimar recomputes)"
        )
