"""Position tables made for one image size, resampled to another (``--img-size``,
``train.init`` into a run of another resolution), as fine-tuning resamples them."""

from __future__ import annotations

import torch

from mimar.errors import CheckpointError


def fit_positions(
    weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor], num_prefix_tokens: int
) -> list[dict]:
    """Resample, in ``weights``, every absolute position table (``*pos_embed``, bicubic, the
    prefix rows kept) and relative position table (``*relative_position_bias_table``, BEiT's
    interpolation) whose shape differs from ``target``'s; returns ``{key, from, to}`` rows."""
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

    done = []
    for key, value in list(weights.items()):
        want = target.get(key)
        if want is None or want.shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.dim() == 3 and value.shape[-1] == want.shape[-1]:
            grid = _side(want.shape[1] - num_prefix_tokens, key, want.shape)
            new = resample_abs_pos_embed(
                value, new_size=[grid, grid], num_prefix_tokens=num_prefix_tokens
            )
        elif key.endswith("relative_position_bias_table") and value.shape[1] == want.shape[1]:
            grid = (_side(want.shape[0] - 3, key, want.shape) + 1) // 2
            new = resize_rel_pos_bias_table(value, (grid, grid), tuple(want.shape))
        else:
            continue  # not a position table: the caller reports the mismatch
        weights[key] = new.to(value.dtype).contiguous()
        done.append({"key": key, "from": list(value.shape), "to": list(want.shape)})
    return done


def _side(n: int, key: str, shape) -> int:
    side = int(round(n**0.5))
    if side * side != n:
        raise CheckpointError(f"{key}: cannot resample to a non-square grid {tuple(shape)}")
    return side
