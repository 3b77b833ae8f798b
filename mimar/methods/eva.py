"""EVA: Exploring the Limits of Masked Visual Representation Learning at Scale.

Fang, Wang, Xie, Sun, Wu, Wang, Huang, Wang, Cao. CVPR 2023. arXiv:2211.07636.

Idea: BEiT-style masked image modelling whose targets are the patch features of a frozen
CLIP vision tower instead of discrete tokens. About 40 % of the patches are hidden in
rectangular blocks and replaced by a mask token inside the encoder; the student's final
(normed) features at hidden positions go through one linear layer to the teacher's width and
are pulled towards the teacher's features of the *unmasked* image with a negative cosine
similarity. Visible tokens and the class token are not supervised.

Glossary (paper / official code -> code): ``bool_masked_pos`` -> ``mask`` (True = hidden);
``num_mask_patches`` -> ``num_mask_patches``; ``lm_head`` -> ``lm_head``; teacher CLIP
features (``ln_post`` and ``proj`` applied to every patch token) -> ``teacher(images)["tokens"]``
(``mimar.teachers``); ``teacher_out_feat_dim`` -> ``teacher.dim``.

Checked against baaivision/EVA @ 5623d08bb0 (``EVA-01/eva``: modeling_pretrain.py,
masking_generator.py, engine_for_pretraining.py) via docs/METHODS.md §3 and §10.8-9: block masking
with min 16 patches and aspect 0.3-3.33, final LayerNorm then Linear(D, D_t) (trunc-normal
0.02) on hidden tokens only, loss -cos averaged over the hidden tokens, computed in fp32.
Deviations: the teacher sees the student's augmented crop resized to its input size (EVA
draws the same crop twice at two resolutions), and masks are drawn by the engine for the
global batch rather than per image in data workers (same distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mimar.engine.contracts import MethodDefaults
from mimar.errors import check_range
from mimar.losses import neg_cosine
from mimar.masking import BlockMasking
from mimar.nn import trunc_normal_


@dataclass(frozen=True, kw_only=True)
class EVAConfig:
    name: Literal["eva"] = "eva"
    mask_ratio: float = 0.4  # EVA README comment "0.4 * 256" (docs/METHODS.md §3.2)
    # 0 -> round(mask_ratio * N). EVA-g/14 sets 105 of 256 explicitly (41 %), which its README
    # calls "0.4 * 256" although that is 102.4 (§3.2)
    num_mask_patches: int = 0
    min_num_patches: int = 16  # EVA run-script default (§1.3; BEiT's generator default is 4)
    max_num_patches: int = 0  # 0 -> no cap beyond the target count (EVA: None)
    min_aspect: float = 0.3  # block aspect ratio in [0.3, 1 / 0.3], log-uniform (§1.3)

    def __post_init__(self) -> None:
        ratio, aspect = self.mask_ratio, self.min_aspect
        check_range("method.mask_ratio", ratio, 0 < ratio < 1, "in (0, 1)")
        for key in ("num_mask_patches", "max_num_patches"):
            value = getattr(self, key)
            check_range(f"method.{key}", value, value >= 0, ">= 0 (0 = derived)")
        check_range(
            "method.min_num_patches", self.min_num_patches, self.min_num_patches >= 1, ">= 1"
        )
        check_range("method.min_aspect", aspect, 0 < aspect <= 1, "in (0, 1]")


class EVA(MethodDefaults, nn.Module):
    """EVA-01 masked feature prediction on a ViT with a mask token.

    The frozen teacher (``mimar.teachers.FrozenTeacher``) is kept as a plain attribute, so it
    is not a submodule: not trained, not in ``state_dict()``, not moved by ``.to()``.
    """

    def __init__(self, cfg: EVAConfig, backbone: nn.Module, teacher) -> None:
        super().__init__()
        if backbone.mask_token is None or backbone.stage_dims != ():  # a plain ViT grid
            raise ValueError(
                "EVA needs a ViT with a mask token: set backbone.name=vit "
                "backbone.use_mask_token=true"
            )
        self.cfg, self.backbone, self.teacher = cfg, backbone, teacher
        n = backbone.num_patches
        # 0.4 x 64 -> 26 (tiny recipe), 0.4 x 196 -> 78 (ViT-B/16 @224), 0.4 x 256 -> 102
        self.num_mask = cfg.num_mask_patches or round(cfg.mask_ratio * n)
        self.masking = BlockMasking(
            backbone.grid_size,
            self.num_mask,
            cfg.min_num_patches,
            cfg.max_num_patches or None,
            cfg.min_aspect,
        )
        # lm_head: the student's final LayerNorm is the backbone's own norm (§3.1)
        self.lm_head = nn.Linear(backbone.embed_dim, teacher.dim)
        trunc_normal_(self.lm_head.weight, std=0.02, a=-0.02, b=0.02)  # ±1 std (§10.8)
        nn.init.zeros_(self.lm_head.bias)

    def sample_corruption(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        """One block mask per image, drawn by the engine for the whole global batch."""
        return {"mask": self.masking(batch_size, generator)}  # (B, N) bool

    def forward(self, images: torch.Tensor, *, mask: torch.Tensor) -> dict:
        mask = mask.to(images.device)  # (B, N), True = hidden
        pred = self.predict(images, mask)  # (B, N, T) student guesses of the teacher features
        target = self.teacher(images)  # the teacher sees the whole (unmasked) image
        loss = neg_cosine(pred[mask], target["tokens"][mask])  # (M, T) hidden tokens only
        return {
            "loss": loss,
            "mask_ratio": mask.float().mean(),
            "teacher_ms": torch.tensor(target["ms"], device=images.device),  # teacher forward
            # block masks hide a varying number of patches: the engine averages over all of
            # the global batch's hidden tokens, as one process does (mimar/engine/loop.py)
            "loss_terms": mask.sum(),
        }

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode with hidden patches replaced by the mask token; project every patch token.

        EVA projects hidden tokens only; projecting all of them costs one small matmul and
        gives the visualisation its per-patch map. The loss reads the hidden ones.
        """
        tokens = self.backbone(images, mask=mask)["tokens"]  # (B, P + N, D) after final norm
        tokens = tokens[:, self.backbone.num_prefix_tokens :]  # (B, N, D), class token dropped
        return self.lm_head(tokens)  # (B, N, T)
