"""The one factory: recipe names -> constructors. Nothing else maps strings to classes."""

from __future__ import annotations

from torch import nn

from mimar.backbones.swin import Swin, SwinConfig
from mimar.backbones.vit import ViT, ViTConfig
from mimar.methods.aim import AIM, AIMConfig
from mimar.methods.simmim import SimMIM, SimMIMConfig


def build_backbone(cfg: ViTConfig | SwinConfig) -> nn.Module:
    if isinstance(cfg, ViTConfig):
        return ViT(cfg)
    if isinstance(cfg, SwinConfig):
        return Swin(cfg)
    raise TypeError(f"no backbone for config {type(cfg).__name__}")


def build_method(cfg) -> nn.Module:
    """Build the pretraining method of a :class:`~mimar.config.PretrainConfig`."""
    backbone = build_backbone(cfg.backbone)
    if isinstance(cfg.method, SimMIMConfig):
        return SimMIM(cfg.method, backbone)
    if isinstance(cfg.method, AIMConfig):
        return AIM(cfg.method, backbone)
    raise TypeError(f"no method for config {type(cfg.method).__name__}")
