"""iTPN with a CLIP teacher: the public ``itpn_clip`` variant of iTPN.

Tian, Ye, Xie, Huang, Qi, Tian, Ye. "Integrally Pre-Trained Transformer Pyramid Networks",
CVPR 2023. arXiv:2211.12735.

Idea: the same HiViT + pyramid neck as the pixel variant (``itpn.py``), pretrained by
regressing a frozen teacher's patch features instead of pixels. Nothing is dropped: a
BEiT-style block mask replaces ~38 % of the main patches by a mask token at the entry of
stage 3 (stages 1-2 and the neck's lateral links see every patch). The three pyramid levels
are downsampled to the main-patch grid and summed ("downsample-and-sum"), then a linear head
predicts the teacher's features; an auxiliary branch does the same from three quarters up
stage 3. Both regress every token with a smooth-L1 loss.

Glossary (code -> here): ``bool_masked_pos`` -> ``mask`` (True = hidden); ``lm_head`` ->
``fusion.head``; ``lm_cls_head`` and its 2 extra blocks -> ``aux_head`` / ``aux_blocks``;
CLIP features + LayerNorm without affine -> ``target``.

Checked against sunsmarterjie/iTPN @ 638eff4879 (``itpn_clip``) via docs/METHODS.md §4.6: block
mask of 75 of 196 with >= 16 per block, fpn_depth 1, level widths D, D/4, D/16 per sub-token
summed, aux branch after block int(0.75 depth) of stage 3, SmoothL1 on all tokens, main +
aux. Deviations (ours): any mimar teacher (``teacher.kind``) can stand in for CLIP, and it is
fed correctly normalised images (the code's ``(x + 1) / 2`` rescaling is not reproduced); no
relative position bias in stage 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mimar.backbones.pyramid import pyramid_backbone
from mimar.engine.contracts import MethodDefaults
from mimar.errors import check_range
from mimar.heads import PyramidFusionHead
from mimar.losses import smooth_l1
from mimar.masking import BlockMasking
from mimar.nn import Block, init_linears


@dataclass(frozen=True, kw_only=True)
class ITPNCLIPConfig:
    name: Literal["itpn_clip"] = "itpn_clip"
    num_mask_patches: int = 75  # of 196 main patches (~38 %), docs/METHODS.md §4.6
    min_num_patches: int = 16  # smallest block, §4.6
    min_aspect: float = 0.3  # block aspect in [0.3, 1/0.3], §1.3
    fpn_dim: int = 256  # §4.2
    fpn_depth: int = 1  # §4.6: one MLP block per fused level in the CLIP model
    aux_depth: int = 2  # extra attention blocks of the auxiliary branch, §4.6
    aux_fraction: float = 0.75  # the branch starts after stage-3 block int(0.75 depth), §4.6
    aux_norm_eps: float = 1e-5  # the aux blocks' LayerNorms: nn.LayerNorm's default (code)
    smooth_l1_beta: float = 1.0  # nn.SmoothL1Loss() default, as the code

    def __post_init__(self) -> None:
        for key in ("num_mask_patches", "min_num_patches"):
            check_range(f"method.{key}", getattr(self, key), getattr(self, key) >= 1, ">= 1")
        check_range("method.fpn_dim", self.fpn_dim, self.fpn_dim > 0, "> 0")
        for key in ("fpn_depth", "aux_depth", "smooth_l1_beta"):
            check_range(f"method.{key}", getattr(self, key), getattr(self, key) >= 0, ">= 0")
        aspect, eps, fraction = self.min_aspect, self.aux_norm_eps, self.aux_fraction
        check_range("method.min_aspect", aspect, 0 < aspect <= 1, "in (0, 1]")
        check_range("method.aux_norm_eps", eps, eps > 0, "> 0")
        check_range("method.aux_fraction", fraction, 0 <= fraction < 1, "in [0, 1)")


class ITPNCLIP(MethodDefaults, nn.Module):
    """iTPN-CLIP on HiViT with a mask token; the frozen teacher is a plain attribute (not a
    submodule: never trained, not in ``state_dict()``; see ``mimar.teachers``)."""

    def __init__(self, cfg: ITPNCLIPConfig, backbone: nn.Module, teacher) -> None:
        super().__init__()
        if backbone.mask_token is None or backbone.stage_dims == ():
            raise ValueError(
                "iTPN-CLIP needs a HiViT with a mask token: set backbone.name=hivit "
                "backbone.use_mask_token=true"
            )
        self.cfg, self.teacher = cfg, teacher
        # trunk.* (HiViT) + neck.*
        self.backbone = pyramid_backbone(backbone, cfg.fpn_dim, cfg.fpn_depth)
        self.masking = BlockMasking(
            backbone.grid_size, cfg.num_mask_patches, cfg.min_num_patches, None, cfg.min_aspect
        )
        D = backbone.embed_dim
        self.fusion = PyramidFusionHead(cfg.fpn_dim, D, teacher.dim, eps=backbone.cfg.norm_eps)
        # the auxiliary branch reads the raw output of stage-3 block int(0.75 depth); HiViT's
        # return_layers counts the 2 * mlp_depth MLP blocks first
        depth = backbone.cfg.depth
        self.aux_layer = 2 * backbone.cfg.mlp_depth + int(cfg.aux_fraction * depth)
        # The aux blocks are stage-3 blocks of the same shape; as the official code, block j
        # takes the trunk's drop-path rate at position aux_layer + j of its linear schedule
        # (~0.083, 0.086 for iTPN-B) and PyTorch's default LayerNorm eps (1e-5).
        c, L = backbone.cfg, backbone.num_layers
        self.aux_blocks = nn.ModuleList(
            Block(
                D,
                c.num_heads,
                mlp_ratio=c.mlp_ratio,
                qkv_bias=c.qkv_bias,
                init_values=c.init_values,
                drop_path=c.drop_path_rate * min(self.aux_layer + j, L - 1) / max(L - 1, 1),
                norm_eps=cfg.aux_norm_eps,
            )
            for j in range(cfg.aux_depth)
        )
        self.aux_norm = nn.LayerNorm(D, eps=backbone.cfg.norm_eps)
        self.aux_head = nn.Linear(D, teacher.dim)
        init_linears(self.aux_blocks)
        init_linears(self.aux_head)

    def sample_corruption(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        """One block mask per image, drawn by the engine for the whole global batch."""
        return {"mask": self.masking(batch_size, generator)}  # (B, N) bool

    def forward(self, images: torch.Tensor, *, mask: torch.Tensor) -> dict:
        mask = mask.to(images.device)  # (B, N), True = hidden
        pred, aux = self.predict(images, mask)  # (B, N, D_t) each
        teacher = self.teacher(images)  # the teacher sees the whole (unmasked) image
        target = self.target(teacher["tokens"])  # (B, N, D_t)
        beta = self.cfg.smooth_l1_beta
        loss_main = smooth_l1(pred, target, beta)  # every token, visible ones too (code)
        loss_aux = smooth_l1(aux, target, beta)
        return {
            "loss": loss_main + loss_aux,
            "loss_main": loss_main.detach(),
            "loss_aux": loss_aux.detach(),
            "mask_ratio": mask.float().mean(),
            "teacher_ms": torch.tensor(teacher["ms"], device=images.device),
        }

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Main prediction from the fused pyramid, auxiliary one from 3/4 up stage 3."""
        out = self.backbone(images, mask=mask, return_layers=(self.aux_layer,), return_pyramid=True)
        pred = self.fusion(out["pyramid"])  # levels (B, N, s, s, F) -> (B, N, D_t)
        x = out["layers"][0]  # (B, N, D) raw stage-3 tokens
        for block in self.aux_blocks:
            x = block(x)
        return pred, self.aux_head(self.aux_norm(x))  # (B, N, D_t)

    @staticmethod
    def target(tokens: torch.Tensor) -> torch.Tensor:
        """Teacher features normalised by a LayerNorm without affine parameters (§4.6)."""
        return F.layer_norm(tokens.float(), tokens.shape[-1:])
