"""AIM: Scalable Pre-training of Large Autoregressive Image Models.

El-Nouby, Klein, Zhai, Bautista, Toshev, Shankar, Susskind, Joulin. ICML 2024.
arXiv:2401.08541.

Idea: read the patches of an image in a fixed order (raster) and regress each next patch's
per-patch-normalised pixels, GPT-style. A prefix of S patches (S drawn per image) attends
bidirectionally, the rest causally, so that the trunk also works with full bidirectional
attention downstream. A heavy per-token MLP head carries the pixel-specific work, so the
trunk's features stay general; no class token, no biases, sin-cos positions twice.

Glossary (paper -> code): prefix length S -> ``prefix_len``; prefix-causal mask ->
``masking.prefix_causal_mask``; MLP head -> ``heads.AIMHead``; patch order -> ``order``
(``order[t]`` = row-major id of the patch at sequence position t); normalised pixel target
-> ``targets.normalize_patches``.

Checked against apple/ml-aim (v1) and apple/ml-l3m via docs/METHODS.md §5 and §10: prefix range
[1, N-1] per sample, loss on non-prefix targets only, head width 2048 x 12 blocks with the
``h += LN(h)`` quirk of the released config (``head_residual_norm``), LN eps 1e-5 in the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mimar.engine.contracts import MethodDefaults
from mimar.errors import check_range
from mimar.heads import AIMHead
from mimar.losses import masked_mse
from mimar.masking import ORDERS, patch_order, prefix_causal_mask, sample_prefix_len
from mimar.nn import sincos_pos_embed_2d
from mimar.targets import normalize_patches, patchify


@dataclass(frozen=True, kw_only=True)
class AIMConfig:
    name: Literal["aim"] = "aim"
    order: Literal["raster", "spiral", "checkerboard", "random"] = "raster"  # AIM Tab. 3b
    order_seed: int = 0  # the fixed permutation of order=random
    prefix_min: int = 1  # S ~ U{prefix_min, ..., prefix_max}: l3m prefix_range [1, N-1]
    prefix_max: int = 0  # 0 -> N - 1
    head_width: int = 2048  # docs/METHODS.md §5.3 (l3m SimpleDecoder)
    head_depth: int = 12  # AIM Tab. 3c: 12 MLP blocks
    head_mlp_ratio: float = 4.0
    head_residual_norm: bool = True  # released-code quirk h += LN(h); False = paper text
    norm_pix_eps: float = 1e-6  # per-patch target normalisation (§5.4)

    def __post_init__(self) -> None:
        for key, ok, allowed in (
            ("head_width", self.head_width > 0, "> 0"),
            ("head_depth", self.head_depth >= 0, ">= 0"),
            ("head_mlp_ratio", self.head_mlp_ratio > 0, "> 0"),
            ("norm_pix_eps", self.norm_pix_eps >= 0, ">= 0"),
        ):
            check_range(f"method.{key}", getattr(self, key), ok, allowed)
        check_range("method.order", self.order, self.order in ORDERS, f"one of {ORDERS}")
        lo, hi = self.prefix_min, self.prefix_max
        check_range(
            "method.prefix_min / prefix_max",
            (lo, hi),
            lo >= 0 and not (hi and hi < lo),
            "0 <= prefix_min <= prefix_max (prefix_max 0 = N - 1)",
        )


class AIM(MethodDefaults, nn.Module):
    def __init__(self, cfg: AIMConfig, backbone: nn.Module) -> None:
        super().__init__()
        if backbone.num_prefix_tokens != 0 or backbone.stage_dims != ():
            raise ValueError(
                "AIM needs a ViT without class token: set backbone.name=vit "
                "backbone.class_token=false"
            )
        self.cfg, self.backbone = cfg, backbone
        self.num_patches = n = backbone.num_patches
        lo, hi = cfg.prefix_min, cfg.prefix_max or n - 1  # S ~ U{lo, ..., hi}
        if hi > n - 1:
            raise ValueError(f"method.prefix_max must be < {n} (the number of patches)")
        if lo > hi:  # a prefix of every patch would leave nothing to predict
            raise ValueError(
                f"method.prefix_min={lo} must be <= {hi} (prefix_max, or N - 1 when it is 0): "
                f"the image has {n} patches"
            )
        self.prefix_range = (lo, hi)
        self.register_buffer(
            "order", patch_order(cfg.order, backbone.grid_size, cfg.order_seed), persistent=False
        )  # (N,)
        self.patch_dim = backbone.patch_size**2 * backbone.in_chans
        self.head = AIMHead(
            backbone.embed_dim,
            cfg.head_width,
            cfg.head_depth,
            cfg.head_mlp_ratio,
            self.patch_dim,
            sincos_pos_embed_2d(cfg.head_width, backbone.grid_size),
            cfg.head_residual_norm,
        )

    def sample_corruption(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        """One prefix length per image, drawn by the engine for the whole global batch."""
        return {"prefix_len": sample_prefix_len(batch_size, *self.prefix_range, generator)}

    def forward(self, images: torch.Tensor, *, prefix_len: torch.Tensor) -> dict:
        prefix_len = prefix_len.to(images.device)  # (B,)
        pred = self.predict(images, prefix_len)  # (B, N, T): position t predicts patch t + 1
        target = self.target(images)  # (B, N, T) in sequence order
        n = self.num_patches
        valid = torch.arange(1, n, device=images.device) >= prefix_len[:, None]  # (B, N-1)
        loss = masked_mse(pred[:, :-1], target[:, 1:], valid)  # non-prefix targets only
        # loss_terms: the engine makes a multi-process loss the mean over the global batch's
        # valid targets (ranks hold different numbers of them), as one process computes it.
        return {"loss": loss, "prefix_len": prefix_len.float().mean(), "loss_terms": valid.sum()}

    def predict(self, images: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
        """Encode the patches in ``order`` under the prefix-causal mask; decode each token."""
        attn_mask = prefix_causal_mask(prefix_len, self.num_patches)  # (B, N, N)
        # order: patch tokens re-ordered after the position embedding, each keeps its position
        tokens = self.backbone(images, order=self.order, attn_mask=attn_mask)["tokens"]  # (B,N,D)
        return self.head(tokens, self.order)  # (B, N, T)

    def target(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images, self.backbone.patch_size)[:, self.order]  # (B, N, T)
        return normalize_patches(patches.float(), self.cfg.norm_pix_eps)
