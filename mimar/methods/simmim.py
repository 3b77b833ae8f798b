"""SimMIM: A Simple Framework for Masked Image Modeling.

Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu. CVPR 2022. arXiv:2111.09886.

Idea: hide random *coarse* square cells of the image (32 px at 192-224 px), replace the
hidden patch embeddings by one learnable mask token inside the encoder, and regress the raw
pixels of the hidden area with a single linear layer (1x1 conv + pixel shuffle) and an L1
loss on hidden pixels only. No decoder transformer, no tokenizer, no per-patch normalisation.

Glossary (paper -> code): mask patch size -> ``mask_patch_size``; masking ratio ->
``mask_ratio``; encoder stride -> ``backbone.out_stride``; prediction head -> ``head``;
M (binary mask) -> ``mask`` (True = hidden).

Checked against microsoft/SimMIM @ d3e29bcac9 (models/simmim.py, data/data_simmim.py), via
docs/METHODS.md §2: exact hidden-cell count ``ceil(cells * ratio)``, mask token replacing the
embedding before position information, targets = the normalised input image itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mimar.engine.contracts import MethodDefaults
from mimar.errors import check_range
from mimar.heads import PixelShuffleHead
from mimar.losses import masked_l1
from mimar.masking import SimMIMMasking
from mimar.targets import upsample_mask


@dataclass(frozen=True, kw_only=True)
class SimMIMConfig:
    name: Literal["simmim"] = "simmim"
    mask_patch_size: int = 32  # SimMIM §4.1 / docs/METHODS.md §2.1: 32-px cells
    mask_ratio: float = 0.6  # SimMIM Tab. 1 / docs/METHODS.md §2.1

    def __post_init__(self) -> None:
        size, ratio = self.mask_patch_size, self.mask_ratio
        check_range("method.mask_patch_size", size, size > 0, "> 0")
        # 0 hides nothing: the loss would average no pixels
        check_range("method.mask_ratio", ratio, 0 < ratio < 1, "in (0, 1)")


class SimMIM(MethodDefaults, nn.Module):
    def __init__(self, cfg: SimMIMConfig, backbone: nn.Module) -> None:
        super().__init__()
        if backbone.mask_token is None:
            raise ValueError("SimMIM needs a mask token: set backbone.use_mask_token=true")
        self.cfg = cfg
        self.backbone = backbone
        self.masking = SimMIMMasking(
            backbone.img_size, cfg.mask_patch_size, backbone.patch_size, cfg.mask_ratio
        )
        self.head = PixelShuffleHead(backbone.embed_dim, backbone.out_stride, backbone.in_chans)

    def sample_corruption(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        """Per-image random draws, made for a whole global batch by the engine."""
        return {"mask": self.masking(batch_size, generator)}  # (B, N) bool

    def forward(self, images: torch.Tensor, *, mask: torch.Tensor) -> dict:
        mask = mask.to(images.device)  # (B, N), True = hidden
        reconstruction = self.reconstruct(images, mask)  # (B, C, H, W)
        pixel_mask = upsample_mask(mask, self.masking.grid, self.backbone.patch_size)
        loss = masked_l1(reconstruction, images, pixel_mask)  # targets = the input itself
        return {"loss": loss, "mask_ratio": mask.float().mean()}

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode with hidden patches replaced by the mask token; predict every pixel."""
        out = self.backbone(images, mask=mask)
        tokens = out["tokens"][:, self.backbone.num_prefix_tokens :]  # (B, n, D), drop CLS
        B, n, D = tokens.shape
        side = int(n**0.5)
        feature_map = tokens.transpose(1, 2).reshape(B, D, side, side)  # (B, D, h, w)
        return self.head(feature_map)  # (B, C, H, W)
