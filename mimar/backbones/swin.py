"""Swin Transformer backbone with SimMIM's mask token.

Swin: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
2021, arXiv:2103.14030. Mask token: Xie et al., "SimMIM: A Simple Framework for Masked Image
Modeling", 2022, arXiv:2111.09886 (docs/METHODS.md §2.2).

timm's ``SwinTransformer`` is the engine, held by composition as ``self.model`` (weight names
``model.patch_embed``, ``model.layers.{s}.blocks.{j}``, ``model.layers.{s}.downsample``,
``model.norm``). SimMIM replaces the *normalised* 4-px patch embeddings of hidden tokens by a
learnable mask token, then runs the four stages and the final norm unchanged. Checked against
microsoft/SimMIM @ 0e7174608f (``models/simmim.py`` ``SwinTransformerForSimMIM``,
``optimizer.py`` ``get_swin_layer``).

Glossary: ``mask`` (B, N) bool on the 4-px token grid, True = hidden; ``w`` its float weight;
stage s has ``depths[s]`` blocks of width ``embed_dim * 2**s`` at stride ``patch_size * 2**s``.
Differences from the contract's ViT reading of ``base.py``: there are no prefix tokens, tokens
cannot be dropped (``keep_ids``) or re-ordered (``order``) and attention cannot be masked
(``attn_mask``), since windows and patch merging need the full row-major grid;
``return_layers`` indexes **stages**, not blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from mimar.errors import check_range
from mimar.nn.init import trunc_normal_
from mimar.nn.layers import GradCheckpointing, replace_drop_paths

_EMBED = ("mask_token", "model.patch_embed.", "model.absolute_pos_embed")
_BLOCK = re.compile(r"model\.layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"model\.layers\.(\d+)\.downsample\.")
_TIMM_NAMES = ("patch_embed.", "layers.", "norm.")  # timm SwinTransformer's, ours under model.


@dataclass(frozen=True, kw_only=True)
class SwinConfig:
    name: Literal["swin"] = "swin"
    img_size: int = 192  # SimMIM Swin-B pretraining input, docs/METHODS.md §2.5
    patch_size: int = 4  # §2.5
    in_chans: int = 3
    embed_dim: int = 128  # Swin-B, §2.5
    depths: tuple[int, ...] = (2, 2, 18, 2)  # Swin-B, §2.5
    num_heads: tuple[int, ...] = (4, 8, 16, 32)  # Swin-B, §2.5
    window_size: int = 6  # 192 px pretraining, §2.5 (7 when fine-tuning at 224, §2.6)
    mlp_ratio: float = 4.0  # §2.5
    qkv_bias: bool = True  # official Swin config default
    drop_path_rate: float = 0.0  # pretraining, §2.5 (0.1 for fine-tuning, §2.6)
    use_mask_token: bool = True  # SimMIM, §2.2

    def __post_init__(self) -> None:
        # YAML gives lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if self.name != "swin":
            raise ValueError(f"backbone.name must be 'swin', got {self.name!r}")
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "window_size"):
            check_range(f"backbone.{key}", getattr(self, key), getattr(self, key) > 0, "> 0")
        depths, heads = self.depths, self.num_heads
        check_range(
            "backbone.depths / num_heads",
            (list(depths), list(heads)),
            bool(depths) and len(depths) == len(heads),
            "non-empty and of equal length (one entry per stage)",
        )
        for key, values in (("depths", depths), ("num_heads", heads)):
            check_range(f"backbone.{key}", list(values), min(values) > 0, "entries > 0")
        for s, h in enumerate(heads):
            width = self.embed_dim * 2**s
            check_range(
                f"backbone.num_heads[{s}]",
                h,
                width % h == 0,
                f"a divisor of the stage width {width}",
            )
        stride = self.patch_size * 2 ** (len(depths) - 1)
        check_range(
            "backbone.img_size",
            self.img_size,
            self.img_size % stride == 0,
            f"divisible by patch_size * 2**(stages - 1) = {stride}, so that every patch merging "
            "halves the grid exactly",
        )
        for s in range(len(depths)):
            grid, window = self.img_size // (self.patch_size * 2**s), self.window_size
            # The official Swin neither pads nor crops: a window tiles the grid, or (as there
            # and in timm) shrinks to the whole grid when the grid is not larger than it.
            check_range(
                "backbone.window_size",
                window,
                grid <= window or grid % window == 0,
                f"a divisor of the {grid}x{grid} token grid of stage {s} "
                f"(img_size={self.img_size})",
            )
        check_range("backbone.mlp_ratio", self.mlp_ratio, self.mlp_ratio > 0, "> 0")
        rate = self.drop_path_rate
        check_range("backbone.drop_path_rate", rate, 0 <= rate < 1, "in [0, 1)")


class Swin(GradCheckpointing, nn.Module):
    """Swin Transformer implementing the Backbone contract of ``mimar.backbones.base``.

    ``forward`` returns ``{"tokens": (B, N, D)}``, the final-stage tokens after the final norm
    in row-major order (N = (img_size / out_stride)**2, D = ``embed_dim``). For Swin the
    ``"layers"`` of the contract are **stages**: ``return_layers=(0, -1)`` gives the raw
    outputs (before the final norm) of the first and last stage, ``(B, N_s, D_s)`` each.
    """

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        num_stages = len(cfg.depths)
        self.stage_dims = tuple(cfg.embed_dim * 2**s for s in range(num_stages))
        self.embed_dim = self.stage_dims[-1]
        self.layer_dims = self.stage_dims  # return_layers taps stages
        self.num_layers = sum(cfg.depths)
        self.num_prefix_tokens = 0
        self.patch_size = cfg.patch_size
        self.out_stride = cfg.patch_size * 2 ** (num_stages - 1)
        self.in_chans, self.img_size = cfg.in_chans, cfg.img_size
        self.grid_size = cfg.img_size // cfg.patch_size  # token grid side at the embedding
        self.num_patches = self.grid_size**2

        # patch_norm and no absolute position embedding, as SimMIM's Swin (docs/METHODS.md §2.2);
        # no classifier head and no pooling: tokens out.
        self.model = SwinTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=cfg.embed_dim,
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            drop_path_rate=cfg.drop_path_rate,
        )
        replace_drop_paths(self.model)  # masks drawn per step, as every mimar block's
        self.mask_token = None
        if cfg.use_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
            # timm's default cut at +-2 (absolute, i.e. +-100 std) as SimMIM's Swin; unlike
            # SimMIM's ViT, which cuts at +-1 std (docs/METHODS.md §10.7).
            trunc_normal_(self.mask_token, std=0.02)
        # also load timm's own names (``mimar export --format timm`` writes them, no ``model.``)
        self.register_load_state_dict_pre_hook(_accept_timm_names)

    def embed(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embedding (conv + LayerNorm) with hidden tokens replaced by the mask token.

        Args:
            images: ``(B, in_chans, img_size, img_size)``.
            mask: bool ``(B, N)`` on the ``patch_size`` token grid, True = hidden.
        Returns:
            ``(B, N, embed_dim_0)`` tokens, row-major, N = ``num_patches``.
        """
        B = images.shape[0]
        expected = (B, self.in_chans, self.img_size, self.img_size)
        if tuple(images.shape) != expected:
            raise ValueError(f"images must be {expected}, got {tuple(images.shape)}")
        x = self.model.patch_embed(images).flatten(1, 2)  # (B, N, C): NHWC grid flattened
        if mask is None:
            return x
        if self.mask_token is None:
            raise ValueError("this Swin has no mask token: set backbone.use_mask_token=true")
        if tuple(mask.shape) != (B, self.num_patches) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be bool (B, N) = {(B, self.num_patches)} on the {self.grid_size}x"
                f"{self.grid_size} token grid, got {mask.dtype} {tuple(mask.shape)}"
            )
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        # SimMIM's blend; w in {0, 1} makes it an exact replacement.
        return x * (1 - w) + self.mask_token.to(x.dtype) * w  # (B, N, C)

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
        if keep_ids is not None:
            raise ValueError("Swin cannot drop tokens (keep_ids): windows need the full grid")
        if order is not None:
            raise ValueError(
                "Swin cannot re-order tokens (order): windows and patch merging need the "
                "row-major grid"
            )
        if attn_mask is not None:
            raise ValueError("Swin does not take an attn_mask: attention is windowed")
        wanted = [self._stage_index(i) for i in return_layers]
        x = self.embed(images, mask)  # (B, N, C)
        x = x.unflatten(1, (self.grid_size, self.grid_size))  # (B, H, W, C): timm's NHWC
        stages = []
        for stage in self.model.layers:
            x = stage(x)  # (B, H_s, W_s, D_s); stages 1.. start with patch merging
            stages.append(x)
        out = {"tokens": self.model.norm(x).flatten(1, 2)}  # (B, N_final, D)
        if return_layers:
            out["layers"] = [stages[s].flatten(1, 2) for s in wanted]  # (B, N_s, D_s) each
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every Swin block (timm's own switch)."""
        self.model.set_grad_checkpointing(enable)

    def _stage_index(self, index: int) -> int:
        num_stages = len(self.stage_dims)
        if not -num_stages <= index < num_stages:
            raise ValueError(
                f"return_layers indexes Swin stages: {index} is not in "
                f"[{-num_stages}, {num_stages - 1}]"
            )
        return index % num_stages

    def layer_id(self, name: str) -> int:
        """SimMIM-Swin layer-decay id of a parameter name as seen from this module (§1.5).

        Embeddings and the mask token 0; block j of stage s ``sum(depths[:s]) + j + 1``; the
        patch merging that opens stage s (timm's ``layers.{s}.downsample``, the end of stage
        s - 1 in the official code) ``sum(depths[:s])``; the rest (final norm) L + 1.
        """
        depths = self.cfg.depths
        if name.startswith(_EMBED):
            return 0
        if match := _BLOCK.match(name):
            stage, block = int(match[1]), int(match[2])
            return sum(depths[:stage]) + block + 1
        if match := _DOWNSAMPLE.match(name):
            return sum(depths[: int(match[1])])
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        """The mask token and every relative position bias table (SimMIM §2.5)."""
        names = {f"model.{n}" for n in self.model.no_weight_decay()}
        return names | ({"mask_token"} if self.mask_token is not None else set())


def _accept_timm_names(module: Swin, state_dict: dict, prefix: str, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if key[len(prefix) :].startswith(_TIMM_NAMES):
            state_dict[prefix + "model." + key[len(prefix) :]] = state_dict.pop(key)
