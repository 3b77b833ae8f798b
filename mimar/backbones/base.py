"""The Backbone contract shared by every encoder (ViT, Swin, HiViT).

A backbone embeds images into tokens and encodes them. It never computes a loss.

``forward(images, *, mask=None, keep_ids=None, attn_mask=None, return_layers=())`` returns a
dict:

* ``"tokens"``: ``(B, P + N, D)`` final tokens after the final norm, *including* the
  ``P = num_prefix_tokens`` prefix tokens (class token) first, exactly like timm's
  ``forward_features``. Patch tokens are ``tokens[:, P:]`` in row-major grid order (only the
  kept ones, in ``keep_ids`` order, when tokens were dropped).
* ``"layers"``: list of raw block outputs (before the final norm), one per index requested in
  ``return_layers`` (0-based block indices, negative counts from the end), same layout as
  ``tokens``. Absent when nothing was requested.
* ``"stages"`` (hierarchical backbones that feed a pyramid neck, i.e. HiViT): the raw outputs
  of the stages before the last, per main patch (``(B, n, s, s, C_s)``), for
  ``mimar.backbones.pyramid.PyramidNeck``.

Boolean masks use True = hidden / to be predicted, everywhere in mimar.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Backbone(Protocol):
    embed_dim: int  # width D of the final tokens
    num_layers: int  # number of blocks (drives layer decay)
    num_prefix_tokens: int  # class token(s) placed before the patch tokens
    patch_size: int  # input pixels per token side at the embedding
    out_stride: int  # input pixels per token side of the final tokens (16 ViT-B, 32 Swin)
    in_chans: int
    img_size: int

    def forward(
        self,
        images: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_layers: tuple[int, ...] = (),
    ) -> dict: ...

    def layer_id(self, name: str) -> int: ...

    def no_weight_decay(self) -> set[str]: ...
