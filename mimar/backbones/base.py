"""The Backbone contract shared by every encoder (ViT, Swin, HiViT, HiViT + pyramid neck).

A backbone embeds images into tokens and encodes them. It never computes a loss.

``forward(images, *, mask=None, keep_ids=None, order=None, attn_mask=None, return_layers=())``

Inputs (all optional; N = ``num_patches`` patch tokens on the ``grid_size x grid_size`` grid,
row-major: id = row * grid_size + col):

* ``mask``: bool ``(B, N)`` in row-major grid order, True = hidden: the patch embedding of a
  hidden patch is replaced by ``mask_token`` (needs one) before any position information.
* ``keep_ids``: long ``(B, n)``, a subset of the patch ids in any order: only these patch
  tokens are encoded, in this order (MAE-style dropping, after the position embedding).
* ``order``: long ``(N,)`` (the same for every image) or ``(B, N)``, a permutation of *all* N
  patch ids: patch tokens are re-ordered after the position embedding (so each keeps its
  own position), prefix tokens stay first; the sequence is then ``prefix + order``. For
  autoregressive methods (AIM, D-iGPT) whose ``attn_mask`` is causal in sequence order. Not
  combined with ``keep_ids`` (pass a permuted subset as ``keep_ids`` instead). The
  permutation is not checked (that would synchronise with the GPU every step).
* ``attn_mask``: SDPA convention, bool (True = *allowed*) or additive float, ``(T, T)``,
  ``(B, T, T)`` or ``(B, 1, T, T)`` over the encoded sequence (prefix tokens included, in
  sequence order: after ``keep_ids`` / ``order``).
* ``return_layers``: 0-based block indices (negative counts from the end).

Returns a dict:

* ``"tokens"``: ``(B, P + n, D)`` final tokens, *including* the ``P = num_prefix_tokens``
  prefix tokens (class token) first, exactly like timm's ``forward_features``: after the final
  norm (a ViT built with ``final_norm=False`` has none and returns the raw last block output).
  Patch tokens are ``tokens[:, P:]`` in row-major grid order, or in ``keep_ids`` / ``order``
  order when given.
* ``"layers"``: list of raw block outputs (before the final norm), one per index requested in
  ``return_layers``, same layout as ``tokens``. Absent when nothing was requested.
* ``"stages"`` (hierarchical backbones that feed a pyramid neck, i.e. HiViT): the raw outputs
  of the stages before the last, per main patch (``(B, n, s, s, C_s)``, in the same patch
  order as ``tokens``), for ``mimar.backbones.pyramid.PyramidNeck``.

Not every backbone supports every input: Swin (windows, patch merging) takes neither
``keep_ids``, ``order`` nor ``attn_mask`` and raises a ValueError naming the argument.

Boolean masks use True = hidden / to be predicted, everywhere in mimar (``attn_mask`` follows
SDPA instead: True = may attend).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Backbone(Protocol):
    embed_dim: int  # width D of the final tokens
    num_layers: int  # number of blocks (drives layer decay)
    num_prefix_tokens: int  # class token(s) placed before the patch tokens
    patch_size: int  # input pixels per token side at the embedding
    out_stride: int  # input pixels per token side of the final tokens (16 ViT-B, 32 Swin)
    in_chans: int
    img_size: int  # training input side in pixels
    grid_size: int  # patch tokens per side at the embedding (img_size // patch_size)
    num_patches: int  # N = grid_size ** 2: the ids that mask / keep_ids / order refer to
    mask_token: nn.Parameter | None  # replaces hidden patches (``mask``); None: no masking
    stage_dims: tuple[int, ...]  # per-stage widths of a hierarchical backbone; () for a ViT
    # width of each output ``return_layers`` can tap, in index order: a ViT's blocks, HiViT's
    # MLP and attention blocks, Swin's stages (evaluation taps them by these)
    layer_dims: tuple[int, ...]

    def forward(
        self,
        images: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep_ids: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_layers: tuple[int, ...] = (),
    ) -> dict: ...

    def layer_id(self, name: str) -> int: ...

    def no_weight_decay(self) -> set[str]: ...


def patch_ids(
    keep_ids: torch.Tensor | None, order: torch.Tensor | None, batch: int, num_patches: int
) -> torch.Tensor | None:
    """The patch ids to encode, in sequence order: ``(B, n)`` long, or None for all in
    row-major order. Checks ``keep_ids`` / ``order`` against the contract above."""
    if order is None:
        if keep_ids is not None and (keep_ids.dim() != 2 or keep_ids.shape[0] != batch):
            raise ValueError(f"keep_ids must be (B, n) with B={batch}, got {tuple(keep_ids.shape)}")
        return keep_ids
    if keep_ids is not None:
        raise ValueError(
            "give either order (a permutation of all patches) or keep_ids (a subset), not both: "
            "a permuted subset is just keep_ids"
        )
    if order.dtype != torch.long or order.shape not in ((num_patches,), (batch, num_patches)):
        raise ValueError(
            f"order must be long (N,) or (B, N) with N={num_patches}, B={batch}: a permutation "
            f"of all patch ids; got {order.dtype} {tuple(order.shape)}"
        )
    return order.expand(batch, num_patches)
