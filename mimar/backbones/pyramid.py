"""iTPN's feature-pyramid neck, and the backbone + neck module that pretraining and
downstream use alike ("integral" pre-training: the neck is pretrained, not bolted on later).

Tian, Ye, et al. "Integrally Pre-Trained Transformer Pyramid Networks", CVPR 2023,
arXiv:2211.12735; official code sunsmarterjie/iTPN (``iTPN`` FPN part), docs/METHODS.md §4.2.

The neck is MLP-only ("C-MLP" in the paper): every operation stays inside a main patch, so it
runs on the kept patches of a masked image exactly as on a full one. Per main patch:

    P16 = Linear(D -> F)(s)                                             (B, n, 1, 1, F)
    P8  = MLPBlock x fpn_depth( PatchSplit(D -> F)(s)  + Linear(C2 -> F)(f8) )   (B, n, 2, 2, F)
    P4  = MLPBlock x fpn_depth( PatchSplit(F -> F)(P8) + Linear(C1 -> F)(f4) )   (B, n, 4, 4, F)
    then one more MLPBlock on each level

``s`` is the stage-3 output (here after HiViT's final norm, see ``hivit.py``); the 16 -> 8
split reads ``s``, not P16, and the 8 -> 4 split reads P8 before its extra block, as the code.
Level names follow the paper at patch 16 (strides 4/8/16 px); at another main-patch size p
the strides are p/4, p/2, p (``PyramidBackbone.strides``).
"""

from __future__ import annotations

import torch
from torch import nn

from mimar.backbones.hivit import split_subtokens
from mimar.nn import MLPBlock


class PatchSplit(nn.Module):
    """One cell -> its 2x2 children inside a main patch: LN -> Linear(C -> 4F, no bias) ->
    :func:`~mimar.backbones.hivit.split_subtokens`."""

    def __init__(self, dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.reduction = nn.Linear(dim, 4 * out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_subtokens(self.reduction(self.norm(x)))  # (B, n, 2h, 2w, F)


class PyramidNeck(nn.Module):
    """P4, P8, P16 of every main patch it is given (docs/METHODS.md §4.2), widths ``fpn_dim``."""

    def __init__(
        self,
        stage_dims: tuple[int, int, int],
        fpn_dim: int = 256,
        fpn_depth: int = 2,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        c1, c2, d = stage_dims
        self.fpn_dim = F = fpn_dim

        def mlp_blocks(count: int) -> nn.Sequential:  # no drop path in the neck
            return nn.Sequential(*(MLPBlock(F, mlp_ratio, 0.0, eps) for _ in range(count)))

        self.reduce16 = nn.Linear(d, F) if d != F else nn.Identity()
        self.split16 = PatchSplit(d, F, eps)
        self.lateral8 = nn.Linear(c2, F, bias=False)
        self.blocks8 = mlp_blocks(fpn_depth)
        self.split8 = PatchSplit(F, F, eps)
        self.lateral4 = nn.Linear(c1, F, bias=False)
        self.blocks4 = mlp_blocks(fpn_depth)
        self.out_blocks = nn.ModuleList(mlp_blocks(1) for _ in range(3))  # P4, P8, P16
        # Official ``_init_weights``: every Linear trunc-normal std 0.02 with zero bias
        # (LayerNorms at 1 / 0, PyTorch's default); docs/METHODS.md §4.2.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self, f4: torch.Tensor, f8: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``f4 (B, n, 4, 4, C1)``, ``f8 (B, n, 2, 2, C2)``, ``s (B, n, D)`` -> P4, P8, P16 as
        ``(B, n, 4, 4, F)``, ``(B, n, 2, 2, F)``, ``(B, n, 1, 1, F)``."""
        s = s[:, :, None, None, :]  # (B, n, 1, 1, D)
        p16 = self.reduce16(s)
        p8 = self.blocks8(self.split16(s) + self.lateral8(f8))
        p4 = self.blocks4(self.split8(p8) + self.lateral4(f4))
        return tuple(block(p) for block, p in zip(self.out_blocks, (p4, p8, p16)))


def patches_to_map(level: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """``(B, N, s, s, F)`` for all N = h * w main patches (row-major) -> ``(B, F, h*s, w*s)``."""
    h, w = (grid, grid) if isinstance(grid, int) else grid
    B, N, s, _, F = level.shape
    x = level.reshape(B, h, w, s, s, F).permute(0, 5, 1, 3, 2, 4)  # (B, F, h, s, w, s)
    return x.reshape(B, F, h * s, w * s)


class PyramidBackbone(nn.Module):
    """A trunk with stage outputs (HiViT) plus its pyramid neck, under the Backbone contract.

    ``forward`` is the trunk's (``"tokens"`` etc.); ``return_pyramid=True`` adds
    ``"pyramid"``: P4, P8, P16 per kept main patch (the layout pretraining needs). The
    contract's attributes are the trunk's (``mask_token`` and ``stage_dims`` read through, so
    the trunk's parameters are not registered twice).
    :meth:`feature_maps` gives the dense maps of full images for a detection/segmentation head.
    Weight names: ``trunk.*`` and ``neck.*``.
    """

    def __init__(self, trunk: nn.Module, neck: PyramidNeck) -> None:
        super().__init__()
        self.trunk, self.neck = trunk, neck
        for key in ("cfg", "embed_dim", "num_layers", "num_prefix_tokens", "patch_size"):
            setattr(self, key, getattr(trunk, key))
        for key in ("out_stride", "in_chans", "img_size", "grid_size", "num_patches", "layer_dims"):
            setattr(self, key, getattr(trunk, key))
        self.fpn_dim = neck.fpn_dim
        p = trunk.patch_size
        self.strides = (p // 4, p // 2, p)  # pixels per cell of P4, P8, P16

    @property
    def mask_token(self) -> nn.Parameter | None:
        return self.trunk.mask_token

    @property
    def stage_dims(self) -> tuple[int, ...]:
        return self.trunk.stage_dims

    def forward(
        self,
        images: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        keep_ids: torch.Tensor | None = None,
        order: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        return_layers: tuple[int, ...] = (),
        return_pyramid: bool = False,
    ) -> dict:
        out = self.trunk(
            images,
            mask=mask,
            keep_ids=keep_ids,
            order=order,
            attn_mask=attn_mask,
            return_layers=return_layers,
        )
        if return_pyramid:
            out["pyramid"] = self.neck(*out["stages"], out["tokens"])
        return out

    def feature_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full images -> ``{"p4": (B, F, H/4, W/4), "p8": ..., "p16": (B, F, H/16, W/16)}``
        at patch 16 (keys name the actual stride in pixels), finest first, like an FPN. H and W
        may differ from the training size (multiples of the main patch; positions resampled)."""
        levels = self(images, return_pyramid=True)["pyramid"]
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return {
            f"p{stride}": patches_to_map(level, grid) for stride, level in zip(self.strides, levels)
        }

    def layer_id(self, name: str) -> int:
        """The trunk's ids for ``trunk.*``; the neck sits on top (``num_layers + 1``)."""
        if name.startswith("trunk."):
            return self.trunk.layer_id(name.removeprefix("trunk."))
        return self.num_layers + 1

    def no_weight_decay(self) -> set[str]:
        return {f"trunk.{name}" for name in self.trunk.no_weight_decay()}


def pyramid_backbone(trunk: nn.Module, fpn_dim: int, fpn_depth: int) -> PyramidBackbone:
    """HiViT + its pyramid neck: the module iTPN pretrains and ``load_backbone`` returns."""
    # the neck reads the earlier stages *inside* each main patch: a hierarchical trunk whose
    # final tokens are still one per main patch (HiViT; not a ViT, not Swin's merged grid)
    if trunk.stage_dims == () or trunk.out_stride != trunk.patch_size:
        raise ValueError(
            "iTPN needs a hierarchical backbone with stage outputs: backbone.name=hivit"
        )
    neck = PyramidNeck(trunk.stage_dims, fpn_dim, fpn_depth, eps=trunk.cfg.norm_eps)
    return PyramidBackbone(trunk, neck)
