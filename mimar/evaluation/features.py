"""Frozen-feature extraction shared by the kNN and linear probes.

One pass over a dataset with the backbone in eval mode, pooling either the final (normed)
tokens or the raw output of one block (a "layer tap") into one vector per image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from rich.progress import track
from torch import nn

Pool = Literal["avg", "cls"]
POOLS: tuple[str, ...] = ("avg", "cls")


def pool_tokens(tokens: torch.Tensor, pool: Pool, num_prefix_tokens: int) -> torch.Tensor:
    """Pool ``(B, P + N, D)`` tokens into ``(B, D)``.

    "avg" averages the N patch tokens only (prefix tokens excluded, as in MAE's global pool);
    "cls" takes token 0, the first prefix token.
    """
    if pool == "avg":
        return tokens[:, num_prefix_tokens:].mean(dim=1)  # (B, D)
    if pool == "cls":
        if num_prefix_tokens == 0:
            raise ValueError("pool='cls' needs a backbone with a class token (num_prefix_tokens=0)")
        return tokens[:, 0]  # (B, D)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def extract_features(
    backbone: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    layer: int | None = None,
    pool: Pool = "avg",
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a frozen backbone over ``batches`` and pool one feature vector per image.

    The backbone must already live on ``device``; images are moved there batch by batch. It
    runs in eval mode under ``torch.inference_mode()`` and is put back into its original
    train/eval mode afterwards.

    Args:
        backbone: any module following the Backbone contract (``mimar.backbones.base``).
        batches: iterable of ``(images (B, C, H, W), labels (B,) or None)``.
        layer: None for the final normed ``"tokens"``; ``i`` for the raw output of block ``i``
            (0-based, negative counts from the end), requested via ``return_layers=(i,)``.
        pool: "avg" (mean over patch tokens, prefix excluded) or "cls" (token 0).
        device: where images are sent; also the autocast device type.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype when given.
        progress: show a rich progress bar (with a total when ``batches`` has a length).

    Returns:
        ``(features (N, D) float32 on CPU, labels (N,) on CPU or None)``. Labels are None only
        when every batch came without labels.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    prefix = backbone.num_prefix_tokens
    if pool == "cls" and prefix == 0:
        raise ValueError("pool='cls' needs a backbone with a class token (num_prefix_tokens=0)")
    device = torch.device(device)
    return_layers = () if layer is None else (layer,)

    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            for images, batch_labels in _maybe_track(batches, progress):
                with _autocast(device, autocast_dtype):
                    out = backbone(images.to(device), return_layers=return_layers)
                tokens = out["tokens"] if layer is None else out["layers"][0]  # (B, P+N, D)
                feats.append(pool_tokens(tokens, pool, prefix).float().cpu())  # (B, D)
                labels.append(None if batch_labels is None else torch.as_tensor(batch_labels))
    finally:
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features got no batches")
    # Concatenate outside inference mode so the result is an ordinary tensor that later probes
    # may use in autograd (inference tensors cannot be saved for backward).
    return torch.cat(feats), _cat_labels(labels)


def _cat_labels(labels: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(y is None for y in labels):
        return None
    if any(y is None for y in labels):
        raise ValueError("either every batch has labels or none does")
    return torch.cat([y.cpu().reshape(-1) for y in labels])  # type: ignore[union-attr]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _maybe_track(batches: Iterable, progress: bool) -> Iterator:
    if not progress:
        return iter(batches)
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    return iter(track(batches, total=total, description="extracting features"))
