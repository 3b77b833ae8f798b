"""Backbones: ViT, Swin, HiViT (and HiViT + pyramid neck), all under the contract of
``mimar.backbones.base``. :func:`build_backbone` maps a backbone config to its module."""

from __future__ import annotations

from torch import nn

from mimar import names


def build_backbone(cfg) -> nn.Module:
    """The backbone of a ``backbone`` config section (ViTConfig, SwinConfig, HiViTConfig)."""
    return names.entry("backbone", cfg.name).module_class()(cfg)
