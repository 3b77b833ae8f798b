"""Vision Transformer shared by every mimar method.

One ViT whose switches cover the variants the papers use (SimMIM/EVA mask token, SimMIM's
shared relative position bias, MAE-style token dropping, AIM's bias-free prefix-causal trunk,
D-iGPT's block-causal mask) instead of one ViT per paper. Weight names follow timm's
``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.ls1.gamma``, ``norm``...), so ``mimar export`` hands
the weights to timm with no key surgery; a ViT with a relative position bias exports to
timm's ``Beit`` instead (``mimar.export``).

Attention uses ``F.scaled_dot_product_attention`` and accepts a mask: boolean (True =
*allowed*, SDPA's convention) or additive float, shaped ``(N, N)``, ``(B, N, N)`` or
``(B, 1, N, N)`` over the full token sequence (prefix tokens included). A relative position
bias is added to it (a boolean mask becomes 0 / -inf first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mimar.backbones.base import patch_ids
from mimar.backbones.timm_beit import from_beit
from mimar.errors import check_range
from mimar.nn import (
    Block,
    GradCheckpointing,
    RelativePositionBias,
    additive_mask,
    default_bias_,
    init_linears,
    sincos_pos_embed_2d,
    trunc_normal_,
    xavier_uniform_split_,
)


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    name: Literal["vit"] = "vit"
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # SimMIM/EVA: q and v biases (a k bias is softmax-invariant)
    proj_bias: bool = True  # False for AIM (no biases in attention proj and MLP)
    class_token: bool = True
    pos_embed: Literal["learn", "sincos", "none"] = "learn"
    init_values: float | None = None  # LayerScale; SimMIM ViT-B uses 0.1
    drop_path_rate: float = 0.0
    use_mask_token: bool = False  # learnable token that replaces hidden patches (SimMIM, EVA)
    fix_init: bool = False  # BEiT/SimMIM: divide proj/fc2 of block l by sqrt(2 l)
    norm_eps: float = 1e-6
    patch_norm: bool = False  # AIM: LayerNorm right after the patch projection (timm's
    # ``patch_embed.norm``, ``embed_norm_layer="layernorm"``)
    weight_init: Literal["trunc_normal", "xavier"] = "trunc_normal"  # AIM: xavier-uniform
    # With xavier: "split" initialises the q, k and v blocks of the fused qkv weight as three
    # D x D matrices, as AIM's separate projections (docs/METHODS.md §5.1, §10.3); "fused" treats
    # it as one 3D x D matrix (bound 0.71x smaller), as MAE / D-iGPT's fused qkv (§6.3).
    qkv_init: Literal["fused", "split"] = "fused"
    # "default": the patch conv bias keeps PyTorch's U(+-1/sqrt(C p p)) init, as the official
    # AIM (docs/METHODS.md §5.1: only the conv weight is re-initialised) and D-iGPT (MAE-style)
    # code; "zeros": SimMIM/EVA (§10.7-8)
    patch_bias_init: Literal["zeros", "default"] = "zeros"
    # "zeros": the official D-iGPT class token starts at zero (§6.3 says only "learnable CLS")
    cls_token_init: Literal["trunc_normal", "zeros"] = "trunc_normal"
    final_norm: bool = True  # False: no final LayerNorm, tokens = raw last block output
    # BEiT-style learned relative position bias added to the attention logits: one table for
    # all blocks ("shared": SimMIM ViT pretraining, docs/METHODS.md §2.2) or one per block
    # ("per_block": SimMIM / BEiT fine-tuning, §2.6; see expand_shared_rel_pos_bias)
    rel_pos_bias: Literal["none", "shared", "per_block"] = "none"

    def __post_init__(self) -> None:
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            check_range(f"backbone.{key}", getattr(self, key), getattr(self, key) > 0, "> 0")
        for key in ("mlp_ratio", "norm_eps"):
            check_range(f"backbone.{key}", getattr(self, key), getattr(self, key) > 0, "> 0")
        rate = self.drop_path_rate
        check_range("backbone.drop_path_rate", rate, 0 <= rate < 1, "in [0, 1)")
        size, patch, dim, heads = self.img_size, self.patch_size, self.embed_dim, self.num_heads
        check_range(
            "backbone.img_size",
            size,
            size % patch == 0,
            f"divisible by backbone.patch_size={patch}",
        )
        check_range(
            "backbone.embed_dim", dim, dim % heads == 0, f"divisible by backbone.num_heads={heads}"
        )
        sincos = self.pos_embed == "sincos"
        check_range(
            "backbone.embed_dim", dim, not sincos or dim % 4 == 0, "divisible by 4 (sincos)"
        )
        for key, allowed in _CHOICES.items():
            if (value := getattr(self, key)) not in allowed:
                raise ValueError(
                    f"backbone.{key} must be one of {', '.join(allowed)}, got {value!r}"
                )
        if self.qkv_init == "split" and self.weight_init != "xavier":
            raise ValueError(
                "backbone.qkv_init=split only applies to backbone.weight_init=xavier (a truncated "
                "normal is the same fused or split)"
            )


_CHOICES = {
    "pos_embed": ("learn", "sincos", "none"),
    "weight_init": ("trunc_normal", "xavier"),
    "qkv_init": ("fused", "split"),
    "patch_bias_init": ("zeros", "default"),
    "cls_token_init": ("trunc_normal", "zeros"),
    "rel_pos_bias": ("none", "shared", "per_block"),
}


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=p, stride=p)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.patch_norm else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)  # (B, N, D), row-major grid
        return x if self.norm is None else self.norm(x)


class ViT(GradCheckpointing, nn.Module):
    """ViT implementing the Backbone contract of ``mimar.backbones.base``."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_dim, self.num_layers = cfg.embed_dim, cfg.depth
        self.patch_size = self.out_stride = cfg.patch_size
        self.in_chans, self.img_size = cfg.in_chans, cfg.img_size
        self.grid_size = cfg.img_size // cfg.patch_size
        self.num_patches = self.grid_size**2
        self.num_prefix_tokens = int(cfg.class_token)
        self.stage_dims: tuple[int, ...] = ()  # not hierarchical
        self.layer_dims = (cfg.embed_dim,) * cfg.depth  # return_layers taps blocks

        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.mask_token = (
            nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.use_mask_token else None
        )
        embed_len = self.num_patches + self.num_prefix_tokens
        if cfg.pos_embed == "none":
            self.pos_embed = None
        else:
            # A fixed sin-cos table is a frozen Parameter (not a buffer) so that it is saved
            # under timm's name ``pos_embed`` and exports as-is.
            self.pos_embed = nn.Parameter(
                torch.zeros(1, embed_len, cfg.embed_dim),
                requires_grad=cfg.pos_embed == "learn",
            )
        # shared: ``rel_pos_bias.*`` as timm's Beit; per block: ``blocks.{i}.attn.rel_pos_bias.*``
        self.rel_pos_bias = self._rel_pos_bias() if cfg.rel_pos_bias == "shared" else None
        # stochastic depth grows linearly with depth (plain floats: builds on the meta device)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias,
                init_values=cfg.init_values,
                drop_path=dpr[i],
                norm_eps=cfg.norm_eps,
                rel_pos_bias=self._rel_pos_bias() if cfg.rel_pos_bias == "per_block" else None,
            )
            for i in range(cfg.depth)
        )
        # final_norm=False (D-iGPT's encoder, docs/METHODS.md §6.3): tokens are the raw last block
        # output and there are no norm.* weights
        self.norm = (
            nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        )
        self.init_weights()
        # also load weights under timm Beit's names (``mimar export`` of a ViT with a relative
        # position bias, or a timm BEiT checkpoint)
        self.register_load_state_dict_pre_hook(_accept_beit_names)

    def _rel_pos_bias(self) -> RelativePositionBias:
        return RelativePositionBias(self.grid_size, self.cfg.num_heads, self.num_prefix_tokens)

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.cfg.weight_init == "xavier":
            # AIM/MAE (docs/METHODS.md §5.1): xavier-uniform linears, the patch conv like a linear
            # layer on its flattened (D, C*p*p) weight
            init_linears(self, "xavier", conv=True, layer_norm=True)
        else:  # SimMIM/EVA: truncated normal, std 0.02 cut at +-1 std (docs/METHODS.md §10.7-8)
            init_linears(self, "trunc_normal", std=0.02, cutoff=0.02, conv=True, layer_norm=True)
        if self.cls_token is not None and self.cfg.cls_token_init == "trunc_normal":
            _trunc_normal(self.cls_token)  # else it stays at zero (D-iGPT)
        if self.mask_token is not None:
            _trunc_normal(self.mask_token)
        if self.pos_embed is not None:
            if self.cfg.pos_embed == "sincos":
                table = sincos_pos_embed_2d(self.cfg.embed_dim, self.grid_size)
                self.pos_embed[:, self.num_prefix_tokens :] = table  # class-token row stays 0
            else:
                _trunc_normal(self.pos_embed)
        for name, table in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                table.zero_()  # SimMIM's shared table starts at zero (docs/METHODS.md §10.7)
        if self.cfg.fix_init:
            for layer, block in enumerate(self.blocks, start=1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))
        # Drawn last, so that the switches below leave every other initial weight as it was.
        if self.cfg.qkv_init == "split":
            for block in self.blocks:
                xavier_uniform_split_(block.attn.qkv.weight, 3)
        if self.cfg.patch_bias_init == "default":
            default_bias_(self.patch_embed.proj)

    def embed(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        keep_ids: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch embedding, mask token, class token, position embedding, token dropping or
        re-ordering (``mimar.backbones.base`` states the contract of the arguments).

        Args:
            images: ``(B, C, H, W)``.
            mask: bool ``(B, N)``, True = hidden: its patch embedding is replaced by the mask
                token *before* position information is added (SimMIM §2.2, EVA §3.1).
            keep_ids: long ``(B, n)`` indices of the patches to keep (MAE-style dropping);
                the others are removed after the position embedding is added.
            order: long ``(N,)`` or ``(B, N)`` permutation of all patch ids: the patch tokens
                are put in this order after the position embedding; prefix tokens stay first.
        Returns:
            ``(B, P + N, D)`` or ``(B, P + n, D)`` tokens.
        """
        x = self.patch_embed(images)  # (B, N, D)
        B, N, D = x.shape
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("this ViT has no mask token: set backbone.use_mask_token=true")
            if mask.shape != (B, N):
                raise ValueError(f"mask must be (B, N) = {(B, N)}, got {tuple(mask.shape)}")
            w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)
        ids = patch_ids(keep_ids, order, B, N)  # (B, n) patch ids in sequence order, or None
        if ids is not None:
            P = self.num_prefix_tokens
            index = ids.unsqueeze(-1).expand(-1, -1, D)  # (B, n, D)
            x = torch.cat([x[:, :P], torch.gather(x[:, P:], 1, index)], dim=1)
        return x

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
        x = self.embed(images, mask, keep_ids, order)  # (B, P + n, D)
        pos_ids = patch_ids(keep_ids, order, x.shape[0], self.num_patches)  # (B, n) or None
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)  # (B, 1, N, N): broadcast over heads
        if self.rel_pos_bias is not None:  # one bias for every block: (heads or B, heads, T, T)
            attn_mask = additive_mask(attn_mask, self.rel_pos_bias(pos_ids))
        for i in return_layers:
            if not -self.num_layers <= i < self.num_layers:
                raise ValueError(f"layer {i} out of range for a ViT of depth {self.num_layers}")
        wanted = {i % self.num_layers for i in return_layers}
        layers = {}
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, attn_mask, pos_ids)  # pos_ids: per-block rel-pos bias
            if i in wanted:
                layers[i] = x
        out = {"tokens": self.norm(x)}  # (B, P + n, D); norm is Identity without final_norm
        if return_layers:
            out["layers"] = [layers[i % self.num_layers] for i in return_layers]
        return out

    def layer_id(self, name: str) -> int:
        """BEiT/MAE layer-decay ids: embeddings 0, block i -> i + 1, the rest L + 1."""
        if name.startswith(("patch_embed", "cls_token", "mask_token", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        tables = {
            n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")
        }
        return {"cls_token", "mask_token", "pos_embed"} | tables


def _accept_beit_names(module: ViT, state_dict: dict, prefix: str, *args) -> None:
    from_beit(state_dict, prefix, module.cfg.proj_bias)


def _trunc_normal(t: torch.Tensor, std: float = 0.02) -> None:
    trunc_normal_(t, std=std, a=-std, b=std)


def expand_shared_rel_pos_bias(
    state_dict: dict[str, torch.Tensor], prefix: str = ""
) -> dict[str, torch.Tensor]:
    """The state dict of a ``rel_pos_bias="shared"`` ViT -> that of the ``"per_block"`` ViT of
    the same shape: the shared table is copied into every block, as SimMIM/BEiT fine-tuning
    initialises its per-block tables (docs/METHODS.md §2.6). Right after the copy both models give
    the same tokens.

    Args:
        state_dict: the shared-table ViT's weights (other keys pass through unchanged).
        prefix: the ViT's key prefix inside ``state_dict``, e.g. ``"backbone."`` for a
            method checkpoint.

    Example::

        per_block = ViT(dataclasses.replace(shared.cfg, rel_pos_bias="per_block"))
        per_block.load_state_dict(expand_shared_rel_pos_bias(shared.state_dict()))
    """
    key = f"{prefix}rel_pos_bias.relative_position_bias_table"
    if key not in state_dict:
        raise ValueError(f"no shared relative position bias table {key!r} in the state dict")
    blocks = {
        k[len(prefix) :].split(".")[1] for k in state_dict if k.startswith(f"{prefix}blocks.")
    }
    out = {k: v for k, v in state_dict.items() if k != key}
    for i in sorted(blocks, key=int):
        out[f"{prefix}blocks.{i}.attn.rel_pos_bias.relative_position_bias_table"] = state_dict[
            key
        ].clone()
    return out
