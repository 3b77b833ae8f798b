"""HiViT: the hierarchical ViT of iTPN, whose early stages never mix main patches.

Zhang, Tian, Wang, Huang, Ye, Xie, Huang, Tian, Ye. "HiViT: A Simpler and More Efficient
Design of Hierarchical Vision Transformer", ICLR 2023, and its use in Tian, Ye, et al.
"Integrally Pre-Trained Transformer Pyramid Networks", CVPR 2023, arXiv:2211.12735.
Checked against sunsmarterjie/iTPN (``itpn_pixel/models/models_itpn_mim.py``,
``det/backbone/iTPN_pixel.py``) via docs/METHODS.md §4.1 and §10.10-11.

Idea: a 16-px *main* patch is embedded as a 4x4 grid of 4-px sub-tokens. Stages 1-2 are
MLP-only blocks (a per-sub-token MLP never looks at another sub-token) with patch merging
*inside* each main patch (4x4 -> 2x2 -> 1x1), so every main patch is processed on its own
until stage 3, a plain ViT over main patches. Masked main patches can therefore be dropped
before the stem, exactly as MAE drops tokens: at 75 % masking the encoder sees a quarter.

Shapes (main patch p, grid g = H / p, N = g*g, n kept patches, stage widths C1 C2 D =
D/4, D/2, D): stem ``(B, n, 4, 4, C1)`` -> stage 1 ``f4`` -> merge -> stage 2 ``f8``
``(B, n, 2, 2, C2)`` -> merge -> ``(B, n, D)`` + position -> stage 3 blocks -> final norm.

Contract notes (``mimar.backbones.base``): no prefix tokens; ``keep_ids`` drops main patches
(never computed, not even by the stem) and ``order`` permutes them, both at the stem (stages
1-2 are per patch, so this equals re-ordering after the position embedding); ``mask`` puts a
mask token at the entry of stage 3 (the CLIP variant, docs/METHODS.md §4.6: stages 1-2 see every
patch); ``attn_mask`` acts in stage 3;
``return_layers`` indexes all ``num_layers = 2 * mlp_depth + depth`` blocks in order (stage-1
and -2 outputs come back as ``(B, n * s * s, C)`` sub-token sequences); the result also holds
``"stages": [f4, f8]`` (raw stage-1 and stage-2 outputs) for the pyramid neck. Images of
another size than ``img_size`` (sides multiples of the main patch) get a bicubically resampled
position table, as in the official detection code.

Deviations (ours): the final LayerNorm ``norm`` (the official pixel encoder has none) gives the
contract's normalised ``tokens``, which also feed the neck; no relative position bias (the
pixel model pretrains without one; the CLIP model's is omitted); the position table is added
as stored unless ``pos_embed_resample`` reproduces the official bicubic resampling (§10.10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mimar.backbones.base import patch_ids
from mimar.errors import check_range
from mimar.nn import (
    Block,
    GradCheckpointing,
    MLPBlock,
    init_linears,
    sincos_pos_embed_2d,
    trunc_normal_,
)

INNER = 4  # sub-tokens per main-patch side at the stem (the official ``inner_patches``)
# PatchMerge gathers the 2x2 children of a cell as (row, col) offsets in this order (Swin's):
MERGE_ORDER = ((0, 0), (1, 0), (0, 1), (1, 1))


@dataclass(frozen=True, kw_only=True)
class HiViTConfig:
    name: Literal["hivit"] = "hivit"
    img_size: int = 224
    patch_size: int = 16  # main patch (docs/METHODS.md §4.1); the stem works at patch_size / 4
    in_chans: int = 3
    embed_dim: int = 512  # D of stage 3; stages 1-2 have D/4 and D/2 (HiViT-B, §4.1)
    mlp_depth: int = 3  # MLP blocks in each of stages 1 and 2 (B: 3, L: 2)
    depth: int = 24  # attention blocks in stage 3 (B: 24, L: 40)
    num_heads: int = 8  # B: 8, L: 12
    mlp_ratio: float = 4.0  # stage 3
    bridge_mlp_ratio: float = 3.0  # stages 1-2 (§4.1)
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale in stage 3: CLIP variant 0.1 (§4.6)
    mlp_init_values: float | None = None  # LayerScale in stages 1-2: CLIP variant 0.1 (§11.4)
    drop_path_rate: float = 0.0  # linear over all 2 * mlp_depth + depth blocks (§4.1.8)
    use_mask_token: bool = False  # CLIP variant: mask token at the entry of stage 3 (§4.6)
    pos_embed_resample: bool = False  # official pixel code: bicubic resample by (g+0.1)/g
    # False: no LayerNorm after stage 3, as the official pixel encoder (its neck reads the raw
    # stage-3 tokens); True (ours): the contract's normalised tokens, which also feed the neck
    final_norm: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.name != "hivit":
            raise ValueError(f"backbone.name must be 'hivit', got {self.name!r}")
        for key in ("img_size", "in_chans", "embed_dim", "num_heads"):
            check_range(f"backbone.{key}", getattr(self, key), getattr(self, key) > 0, "> 0")
        for key in ("mlp_ratio", "bridge_mlp_ratio", "norm_eps"):
            check_range(f"backbone.{key}", getattr(self, key), getattr(self, key) > 0, "> 0")
        rate = self.drop_path_rate
        check_range("backbone.drop_path_rate", rate, 0 <= rate < 1, "in [0, 1)")
        patch, size, dim, heads = self.patch_size, self.img_size, self.embed_dim, self.num_heads
        check_range(
            "backbone.patch_size",
            patch,
            patch >= INNER and patch % INNER == 0,
            f"a multiple of {INNER}: each main patch is a {INNER}x{INNER} grid of sub-tokens",
        )
        check_range(
            "backbone.img_size",
            size,
            size % patch == 0,
            f"divisible by backbone.patch_size={patch}",
        )
        check_range(
            "backbone.embed_dim",
            dim,
            dim % 4 == 0 and dim % heads == 0,
            f"divisible by 4 (stage widths D/4, D/2, D) and by backbone.num_heads={heads}",
        )
        check_range("backbone.mlp_depth", self.mlp_depth, self.mlp_depth >= 0, ">= 0")
        check_range("backbone.depth", self.depth, self.depth >= 1, ">= 1")


def merge_subtokens(x: torch.Tensor) -> torch.Tensor:
    """``(..., h, w, C)`` -> ``(..., h/2, w/2, 4C)``: channel chunk k of each output cell is its
    child at offset ``MERGE_ORDER[k]`` (HiViT/Swin PatchMerge, docs/METHODS.md §4.1.4)."""
    return torch.cat([x[..., r::2, c::2, :] for r, c in MERGE_ORDER], dim=-1)


def split_subtokens(x: torch.Tensor) -> torch.Tensor:
    """``(..., h, w, 4F)`` -> ``(..., 2h, 2w, F)``: chunk ``k = 2 r + c`` becomes child (r, c),
    row-major (iTPN PatchSplit, docs/METHODS.md §4.2). Not the inverse of :func:`merge_subtokens`,
    whose order is column-first; the learned linears on both sides make the order immaterial."""
    *lead, h, w, C = x.shape
    x = x.reshape(*lead, h, w, 2, 2, C // 4).transpose(-4, -3)  # (..., h, 2, w, 2, F)
    return x.reshape(*lead, 2 * h, 2 * w, C // 4)


class PatchMerge(nn.Module):
    """2x2 children -> one cell inside each main patch: LN(4C) -> Linear(4C -> 2C, no bias)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(merge_subtokens(x)))  # (B, n, h/2, w/2, 2C)


class PatchEmbed(nn.Module):
    """Stem: each main patch -> a 4x4 grid of sub-tokens (Conv p/4, stride p/4) + LayerNorm."""

    def __init__(self, cfg: HiViTConfig) -> None:
        super().__init__()
        k = cfg.patch_size // INNER
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim // 4, kernel_size=k, stride=k)
        self.norm = nn.LayerNorm(cfg.embed_dim // 4, eps=cfg.norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, n, C, p, p)`` pixels of the kept main patches -> ``(B, n, 4, 4, C1)``."""
        B, n = patches.shape[:2]
        x = self.proj(patches.flatten(0, 1))  # (B*n, C1, 4, 4)
        return self.norm(x.permute(0, 2, 3, 1).reshape(B, n, INNER, INNER, -1))


class HiViT(GradCheckpointing, nn.Module):
    """HiViT implementing the Backbone contract of ``mimar.backbones.base``."""

    def __init__(self, cfg: HiViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D, m, eps = cfg.embed_dim, cfg.mlp_depth, cfg.norm_eps
        self.embed_dim, self.num_layers, self.num_prefix_tokens = D, 2 * m + cfg.depth, 0
        self.patch_size = self.out_stride = cfg.patch_size
        self.in_chans, self.img_size = cfg.in_chans, cfg.img_size
        self.grid_size = cfg.img_size // cfg.patch_size
        self.num_patches = self.grid_size**2
        self.stage_dims = (D // 4, D // 2, D)  # f4, f8, stage 3 (the Backbone contract)
        self.layer_dims = (D // 4,) * m + (D // 2,) * m + (D,) * cfg.depth  # every block

        dpr = [cfg.drop_path_rate * i / max(self.num_layers - 1, 1) for i in range(self.num_layers)]
        self.patch_embed = PatchEmbed(cfg)
        self.stage1 = nn.ModuleList(
            MLPBlock(D // 4, cfg.bridge_mlp_ratio, dpr[j], eps, cfg.mlp_init_values)
            for j in range(m)
        )
        self.merge1 = PatchMerge(D // 4, eps)
        self.stage2 = nn.ModuleList(
            MLPBlock(D // 2, cfg.bridge_mlp_ratio, dpr[m + j], eps, cfg.mlp_init_values)
            for j in range(m)
        )
        self.merge2 = PatchMerge(D // 2, eps)
        # Stage 3 is a plain ViT over main patches: the shared pre-norm attention block.
        self.blocks = nn.ModuleList(
            Block(
                D,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                init_values=cfg.init_values,
                drop_path=dpr[2 * m + i],
                norm_eps=eps,
            )
            for i in range(cfg.depth)
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.use_mask_token else None
        # sin-cos initialised and trainable, as the official pixel model (§4.1.6)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, D))
        self.norm = nn.LayerNorm(D, eps=eps) if cfg.final_norm else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # Official: every Linear trunc-normal std 0.02 (timm's default cut at +-2, i.e. in
        # effect untruncated), zero biases, LayerNorms 1/0; the stem conv keeps PyTorch's init.
        init_linears(self, layer_norm=True)
        self.pos_embed[0] = sincos_pos_embed_2d(self.embed_dim, self.grid_size)
        if self.mask_token is not None:
            trunc_normal_(self.mask_token, std=0.02)  # ours: the BEiT convention

    def embed(self, images: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Cut ``(B, C, H, W)`` into main patches, keep ``keep_ids`` (all when None; any
        order), stem them.

        Returns ``(B, n, 4, 4, C1)``: the dropped patches never reach a single layer.
        """
        B, C, H, W = images.shape
        p = self.patch_size
        if C != self.in_chans or H % p or W % p:
            raise ValueError(
                f"HiViT expects images (B, {self.in_chans}, H, W) with H and W multiples of the "
                f"main patch {p} (trained at {self.img_size}), got {tuple(images.shape)}"
            )
        h, w = H // p, W // p
        patches = images.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).flatten(1, 2)
        if keep_ids is not None:  # (B, n): gather the kept main patches, pixels and all
            index = keep_ids[:, :, None, None, None].expand(-1, -1, C, p, p)
            patches = torch.gather(patches, 1, index)  # (B, n, C, p, p)
        return self.patch_embed(patches)

    def position_table(
        self, h: int | None = None, w: int | None = None, all_kept: bool = True
    ) -> torch.Tensor:
        """``(1, h * w, D)`` for an ``h x w`` main-patch grid (default: the trained one): the
        table as stored, or bicubically resampled -- to another grid (downstream inputs of
        other sizes, as the official detection code), or by ``(g + 0.1) / g`` as the official
        pixel pretraining code does when tokens were dropped (``pos_embed_resample``,
        docs/METHODS.md §10.10; with every patch kept the official code returns the stored
        table)."""
        g, D = self.grid_size, self.embed_dim
        h, w = h or g, w or g
        resample = self.cfg.pos_embed_resample and not all_kept
        if (h, w) == (g, g) and not resample:
            return self.pos_embed
        grid = self.pos_embed.reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        if resample:  # output h x w: floor(g * (h + 0.1) / g) = h
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
        else:
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, h * w, D)

    def forward(
        self,
        images: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep_ids: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_layers: tuple[int, ...] = (),
    ) -> dict:
        if mask is not None and keep_ids is not None:
            raise ValueError(
                "HiViT takes either mask (mask token) or keep_ids (dropping), not both"
            )
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        # Stages 1-2 never mix main patches, so re-ordering them at the stem is the same as
        # re-ordering stage-3 tokens after the position embedding (the contract's ``order``);
        # the mask (row-major) and the positions follow the same permutation.
        ids = patch_ids(keep_ids, order, images.shape[0], h * w)  # (B, n) or None
        if order is not None and mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(
                    f"mask must be (B, N) = {tuple(ids.shape)}, got {tuple(mask.shape)}"
                )
            mask = torch.gather(mask, 1, ids)
        wanted = self._wanted(return_layers)
        layers: dict[int, torch.Tensor] = {}
        x = self.embed(images, ids)  # (B, n, 4, 4, C1)
        stages, index = [], 0
        for stage, merge in ((self.stage1, self.merge1), (self.stage2, self.merge2)):
            for block in stage:
                x = self.run_block(block, x)
                if index in wanted:
                    layers[index] = x.flatten(1, 3)  # (B, n*s*s, C): sub-tokens as a sequence
                index += 1
            stages.append(x)  # f4 (B, n, 4, 4, C1), then f8 (B, n, 2, 2, C2)
            x = merge(x)
        x = x.flatten(1, 3)  # (B, n, D): one token per main patch
        if mask is not None:
            x = self._apply_mask_token(x, mask)
        all_kept = ids is None or ids.shape[1] == h * w  # official: no resampling then
        pos = self.position_table(h, w, all_kept).to(x.dtype).expand(x.shape[0], -1, -1)
        if ids is not None:
            pos = torch.gather(pos, 1, ids.unsqueeze(-1).expand(-1, -1, self.embed_dim))
        x = x + pos
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, n, n): broadcast over heads
        for block in self.blocks:
            x = self.run_block(block, x, attn_mask)
            if index in wanted:
                layers[index] = x
            index += 1
        out = {"tokens": self.norm(x), "stages": stages}  # tokens (B, n, D)
        if return_layers:
            out["layers"] = [layers[i % self.num_layers] for i in return_layers]
        return out

    def _apply_mask_token(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mask_token is None:
            raise ValueError("this HiViT has no mask token: set backbone.use_mask_token=true")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must be (B, N) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return x * (1 - w) + self.mask_token.to(x.dtype) * w

    def _wanted(self, return_layers: tuple[int, ...]) -> set[int]:
        L = self.num_layers
        for i in return_layers:
            if not -L <= i < L:
                raise ValueError(f"layer {i} out of range for a HiViT with {L} blocks")
        return {i % L for i in return_layers}

    def layer_id(self, name: str) -> int:
        """Layer-decay ids as the official iTPN fine-tuning code: stem and positions 0, every
        block (MLP or attention) its own id in order, a PatchMerge the id of the block before
        it, the rest (final norm) ``num_layers + 1``."""
        m = self.cfg.mlp_depth
        if name.startswith(("patch_embed", "pos_embed", "mask_token")):
            return 0
        if name.startswith("stage1."):
            return int(name.split(".")[1]) + 1
        if name.startswith("merge1."):
            return m
        if name.startswith("stage2."):
            return m + int(name.split(".")[1]) + 1
        if name.startswith("merge2."):
            return 2 * m
        if name.startswith("blocks."):
            return 2 * m + int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        # As every mimar backbone (the official pixel pretraining decays both, docs/METHODS.md §4.5)
        return {"pos_embed", "mask_token"}
