"""Feature pyramids for dense heads: four maps of width F, finest first, for every backbone.

* **Plain ViT** -> ViTDet's *simple feature pyramid* (Li, Mao, Girshick & He, "Exploring Plain
  Vision Transformer Backbones for Object Detection", ECCV 2022, arXiv:2203.16527, Fig. 2c):
  from the last block's map at stride p only, scales 4 (two 2x2 deconvolutions, LayerNorm +
  GELU between), 2 (one deconvolution), 1 (identity) and 1/2 (2x2 max pooling), each then
  ``Conv1x1 -> LN -> Conv3x3 -> LN`` to F channels. Strides p/4, p/2, p, 2p.
* **Swin** -> its stage outputs (strides p, 2p, 4p, ...) through an FPN (Lin et al., CVPR 2017;
  torchvision's ``FeaturePyramidNetwork``), each stage LayerNorm-ed first (as Swin's detection
  code adds a norm per output stage); a coarser level by max pooling when the Swin has fewer
  than four stages.
* **iTPN / HiViT** -> its *pretrained* pyramid as is: P4, P8, P16 of the neck trained with the
  backbone (``PyramidBackbone.feature_maps``), plus a stride-2p level by 2x2 max pooling of the
  coarsest (the paper's detection setting adds its stride-32 level the same way).

Every pyramid's parameters live outside the backbone (ViT, Swin) or in the backbone's neck
(iTPN: ``backbone.neck.*``); both get the top layer-decay id ``L + 1``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from mimar.backbones.pyramid import PyramidBackbone

LEVELS = 4


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one stride-p map ``(B, D, h, w)`` -> 4 maps ``(B, F, .., ..)``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        half, quarter = dim // 2, dim // 4
        self.scales = nn.ModuleList(
            [
                nn.Sequential(  # x4
                    nn.ConvTranspose2d(dim, half, 2, stride=2),
                    LayerNorm2d(half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                nn.ConvTranspose2d(dim, half, 2, stride=2),  # x2
                nn.Identity(),  # x1
                nn.MaxPool2d(2),  # x1/2
            ]
        )
        self.outputs = nn.ModuleList(
            _conv_ln(channels, out_dim) for channels in (quarter, half, dim, dim)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]


def _conv_ln(dim: int, out_dim: int) -> nn.Sequential:
    """ViTDet's output convolutions: Conv1x1 -> LN -> Conv3x3 -> LN, no biases."""
    return nn.Sequential(
        nn.Conv2d(dim, out_dim, 1, bias=False),
        LayerNorm2d(out_dim),
        nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
        LayerNorm2d(out_dim),
    )


class StageFPN(nn.Module):
    """Swin's stage maps -> LayerNorm per stage -> FPN to F channels (+ pooled levels)."""

    def __init__(self, stage_dims: tuple[int, ...], out_dim: int) -> None:
        super().__init__()
        dims = stage_dims[-LEVELS:]
        self.norms = nn.ModuleList(LayerNorm2d(d) for d in dims)
        self.fpn = FeaturePyramidNetwork(list(dims), out_dim)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = maps[-LEVELS:]
        named = OrderedDict((str(i), norm(m)) for i, (norm, m) in enumerate(zip(self.norms, maps)))
        return _pooled_to_four(list(self.fpn(named).values()))


def _pooled_to_four(levels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Add coarser levels by 2x2 max pooling of the coarsest until there are four."""
    while len(levels) < LEVELS:
        levels.append(F.max_pool2d(levels[-1], 2))
    return levels


class DensePyramid(nn.Module):
    """``(backbone, images) -> OrderedDict(p<stride>: (B, F, H/stride, W/stride))``, 4 levels,
    finest first; its own layers are ``fpn`` (none for iTPN). It holds no backbone (the
    backbone is an argument), so that its weights are registered once, as ``backbone.*``."""

    def __init__(self, backbone: nn.Module, out_dim: int) -> None:
        super().__init__()
        p = backbone.patch_size
        if isinstance(backbone, PyramidBackbone):  # iTPN: the pretrained neck, as is
            self.kind, self.out_dim, self.fpn = "pretrained", backbone.fpn_dim, nn.Identity()
            self.strides = (*backbone.strides, 2 * p)
        elif backbone.stage_dims:  # Swin
            self.kind, self.out_dim = "fpn", out_dim
            self.fpn = StageFPN(backbone.stage_dims, out_dim)
            strides = [p * 2**s for s in range(len(backbone.stage_dims))][-LEVELS:]
            while len(strides) < LEVELS:
                strides.append(2 * strides[-1])
            self.strides = tuple(strides)
        else:  # plain ViT
            if p % 4:
                raise ValueError(f"ViTDet's pyramid needs a patch size divisible by 4, got {p}")
            self.kind, self.out_dim = "simple", out_dim
            self.fpn = SimpleFeaturePyramid(backbone.embed_dim, out_dim)
            self.strides = (p // 4, p // 2, p, 2 * p)
        self.names = tuple(f"p{s}" for s in self.strides)

    def forward(self, backbone: nn.Module, images: torch.Tensor) -> OrderedDict:
        H, W = images.shape[-2:]
        if self.kind == "pretrained":
            levels = _pooled_to_four(list(backbone.feature_maps(images).values()))
        elif self.kind == "fpn":
            stages = range(len(backbone.stage_dims))
            tokens = backbone(images, return_layers=tuple(stages))["layers"]  # (B, N_s, D_s)
            maps = [
                _to_map(t, H // (backbone.patch_size * 2**s), W // (backbone.patch_size * 2**s))
                for s, t in zip(stages, tokens)
            ]
            levels = self.fpn(maps)
        else:
            tokens = backbone(images)["tokens"][:, backbone.num_prefix_tokens :]  # (B, N, D)
            p = backbone.patch_size
            levels = self.fpn(_to_map(tokens, H // p, W // p))  # from (B, D, H/p, W/p)
        return OrderedDict(zip(self.names, levels))


def _to_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens ``(B, h*w, D)`` -> map ``(B, D, h, w)``."""
    return tokens.transpose(1, 2).unflatten(2, (h, w))
