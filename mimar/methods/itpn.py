"""iTPN: Integrally Pre-Trained Transformer Pyramid Networks.

Tian, Ye, Xie, Huang, Qi, Tian, Ye. CVPR 2023. arXiv:2211.12735.

Idea: pretrain the backbone *and* its feature pyramid together, so that detection and
segmentation inherit a pretrained pyramid instead of a random one. A hierarchical ViT (HiViT)
drops 75 % of the 16-px main patches; an MLP-only pyramid neck turns the kept patches into
P4/P8/P16; a decoder fusing the three levels reconstructs the per-patch normalised pixels of
the dropped patches (masked image modeling, MIM). Masked feature modeling (MFM) adds a teacher
that sees the whole image and whose pyramid features are predicted at the dropped patches:
``L = L_pixel + lambda * L_MFM``.

Glossary (paper -> code): main patch -> ``backbone.patch_size``; ids_keep -> ``keep_ids``;
mask (1 = removed) -> ``hidden`` (True = dropped); feature pyramid -> ``pyramid`` (P4, P8,
P16, finest first); decoder_pred -> ``pixel_head``; lambda -> ``mfm_weight``; teacher ->
``ema``; per-stage projection heads -> ``mfm_heads``.

Checked against sunsmarterjie/iTPN @ 638eff4879 (``itpn_pixel``) via docs/METHODS.md §4.1-4.5 and
§10.10-11: int(N * 0.25) kept main patches, the neck as the code's FPN part, level widths
Dd, Dd/4, Dd/16 per sub-token sharing one mask token, norm-pixel MSE on dropped patches.
MFM was never released (docs/METHODS.md §4.7, §8.2): the paper's description is implemented and
every concrete choice not in the paper is marked "ours" below.
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
from mimar.heads import PyramidPixelDecoder
from mimar.losses import masked_mse
from mimar.masking import hidden_from_keep, random_keep
from mimar.targets import normalize_patches, patchify
from mimar.teachers.ema import ema_teacher, ema_update_

SUB_TOKENS = (4, 2, 1)  # sub-token grid side per main patch of P4, P8, P16


@dataclass(frozen=True, kw_only=True)
class ITPNConfig:
    name: Literal["itpn"] = "itpn"
    mask_ratio: float = 0.75  # iTPN §4.1 (MAE random masking of main patches), code default
    fpn_dim: int = 256  # docs/METHODS.md §4.2
    fpn_depth: int = 2  # §4.2: MLP blocks per fused level in the pixel model
    decoder_dim: int = 512  # §4.3
    decoder_depth: int = 8  # §4.3
    decoder_num_heads: int = 16  # §4.3
    norm_pix_eps: float = 1e-6  # §4.4
    mfm: bool = True  # paper §3.3; false = pixel MIM only (paper Tab. 6 ablation, public code)
    mfm_weight: float = 0.3  # lambda, paper §3.3 (not in code, docs/METHODS.md §4.7)
    ema_momentum: float = 0.996  # EMA teacher, paper §3.3 (not in code, §4.7)

    def __post_init__(self) -> None:
        ratio, momentum = self.mask_ratio, self.ema_momentum
        check_range("method.mask_ratio", ratio, 0 < ratio < 1, "in (0, 1)")
        for key in ("fpn_dim", "decoder_dim", "decoder_num_heads"):
            check_range(f"method.{key}", getattr(self, key), getattr(self, key) > 0, "> 0")
        for key in ("fpn_depth", "decoder_depth", "mfm_weight", "norm_pix_eps"):
            check_range(f"method.{key}", getattr(self, key), getattr(self, key) >= 0, ">= 0")
        check_range("method.ema_momentum", momentum, 0 <= momentum <= 1, "in [0, 1]")
        check_range(
            "method.decoder_dim",
            self.decoder_dim,
            self.decoder_dim % 16 == 0,
            "divisible by 16: P4 is embedded as 16 sub-tokens of decoder_dim / 16 each "
            "(docs/METHODS.md §4.3)",
        )


class ITPN(MethodDefaults, nn.Module):
    def __init__(self, cfg: ITPNConfig, backbone: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        # trunk.* (HiViT) + neck.*
        self.backbone = pyramid_backbone(backbone, cfg.fpn_dim, cfg.fpn_depth)
        self.num_patches = N = backbone.num_patches
        self.num_keep = int(N * (1 - cfg.mask_ratio))  # 49 of 196 at 224 px (official int())
        if self.num_keep < 1:
            raise ValueError(f"method.mask_ratio={cfg.mask_ratio} keeps no patch of {N}")
        self.decoder = PyramidPixelDecoder(
            cfg.fpn_dim,
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_num_heads,
            backbone.grid_size,
        )
        self.pixel_head = nn.Linear(cfg.decoder_dim, backbone.patch_size**2 * backbone.in_chans)
        nn.init.trunc_normal_(self.pixel_head.weight, std=0.02)
        nn.init.zeros_(self.pixel_head.bias)
        self.ema, self.mfm_heads = None, None
        if cfg.mfm:  # built last: with or without MFM, the rest starts from the same weights
            # Ours: the teacher is an EMA copy of backbone + neck (the paper's "EMA of the
            # student"), a registered submodule so that checkpoints carry it; requires_grad is
            # off, so the optimizer never sees it and it gets no gradient.
            self.ema = ema_teacher(self.backbone)
            # Ours: one linear head per pyramid level on the decoder tokens, predicting the
            # s x s sub-token features (width fpn_dim) of that level for each main patch.
            self.mfm_heads = nn.ModuleList(
                nn.Linear(cfg.decoder_dim, s * s * cfg.fpn_dim) for s in SUB_TOKENS
            )
            for head in self.mfm_heads:
                nn.init.trunc_normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    def sample_corruption(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        """The kept main patches of every image, drawn by the engine for the global batch."""
        return {"keep_ids": random_keep(batch_size, self.num_patches, self.num_keep, generator)}

    def forward(self, images: torch.Tensor, *, keep_ids: torch.Tensor) -> dict:
        keep_ids = keep_ids.to(images.device)  # (B, n) kept main patches, row-major ids
        hidden = hidden_from_keep(keep_ids, self.num_patches)  # (B, N), True = dropped
        z = self.decode(images, keep_ids)  # (B, N, Dd) decoder tokens of all patches
        pred = self.pixel_head(z)  # (B, N, p*p*C)
        loss_pixel = masked_mse(pred, self.pixel_target(images), hidden)  # dropped patches only
        out = {"loss": loss_pixel, "loss_pixel": loss_pixel.detach()}
        if self.ema is not None:
            loss_mfm = self.mfm_loss(images, z, hidden)
            out["loss"] = loss_pixel + self.cfg.mfm_weight * loss_mfm  # L = L_pix + lambda L_MFM
            out["loss_mfm"] = loss_mfm.detach()
        out["mask_ratio"] = hidden.float().mean()
        return out

    def decode(self, images: torch.Tensor, keep_ids: torch.Tensor) -> torch.Tensor:
        """Encode the kept patches only (HiViT + neck), fuse P4/P8/P16 in the decoder."""
        pyramid = self.backbone(images, keep_ids=keep_ids, return_pyramid=True)["pyramid"]
        return self.decoder(pyramid, keep_ids)  # (B, N, Dd); levels (B, n, s, s, F) in

    def pixel_target(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images.float(), self.backbone.patch_size)  # (B, N, p*p*C)
        return normalize_patches(patches, self.cfg.norm_pix_eps)

    def mfm_loss(self, images: torch.Tensor, z: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Masked feature modeling (paper §3.3; every concrete choice here is ours, §4.7).

        Teacher: the EMA backbone + neck on the *full* image, no gradient. Target of level l:
        its ``(B, N, s, s, F)`` features, each sub-token normalised by a LayerNorm without
        affine parameters. Prediction: ``mfm_heads[l](z)`` on the decoder tokens (the student
        computed nothing at dropped patches, so the decoder is where they exist). Per level,
        the squared error is averaged over the ``s*s*F`` values of a patch, then over the
        dropped patches of the batch (as the pixel loss); L_MFM is the mean over the 3 levels,
        so that lambda weighs one level-averaged loss against the pixel loss.
        """
        with torch.no_grad():
            targets = self.ema(images, return_pyramid=True)["pyramid"]  # P4, P8, P16, all N
        losses = []
        for head, target in zip(self.mfm_heads, targets):
            target = F.layer_norm(target.float(), target.shape[-1:])  # (B, N, s, s, F)
            losses.append(masked_mse(head(z), target.flatten(2), hidden))  # (B, N, s*s*F)
        return torch.stack(losses).mean()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update after every optimizer step: ``teacher = m * teacher + (1 - m) * student``
        (constant momentum m, ours: the paper gives only its value)."""
        if self.ema is None:
            return
        ema_update_(self.ema, self.backbone, self.cfg.ema_momentum)

    def train(self, mode: bool = True) -> ITPN:
        super().train(mode)
        if self.ema is not None:
            self.ema.eval()  # ours: the teacher always runs without drop path
        return self
