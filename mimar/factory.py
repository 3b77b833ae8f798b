"""The one factory: recipe names -> constructors. Nothing else maps strings to classes."""

from __future__ import annotations

from torch import nn

from mimar.backbones.hivit import HiViT, HiViTConfig
from mimar.backbones.swin import Swin, SwinConfig
from mimar.backbones.vit import ViT, ViTConfig
from mimar.data import normalization_stats
from mimar.methods.aim import AIM, AIMConfig
from mimar.methods.digpt import DiGPT, DiGPTConfig
from mimar.methods.eva import EVA, EVAConfig
from mimar.methods.itpn import ITPN, ITPNConfig, pyramid_backbone
from mimar.methods.itpn_clip import ITPNCLIP, ITPNCLIPConfig
from mimar.methods.simmim import SimMIM, SimMIMConfig
from mimar.teachers import build_teacher


def build_backbone(cfg: ViTConfig | SwinConfig | HiViTConfig) -> nn.Module:
    if isinstance(cfg, ViTConfig):
        return ViT(cfg)
    if isinstance(cfg, SwinConfig):
        return Swin(cfg)
    if isinstance(cfg, HiViTConfig):
        return HiViT(cfg)
    raise TypeError(f"no backbone for config {type(cfg).__name__}")


def build_method(cfg) -> nn.Module:
    """Build the pretraining method of a :class:`~mimar.config.PretrainConfig`."""
    backbone = build_backbone(cfg.backbone)
    if isinstance(cfg.method, SimMIMConfig):
        return SimMIM(cfg.method, backbone)
    if isinstance(cfg.method, AIMConfig):
        return AIM(cfg.method, backbone)
    if isinstance(cfg.method, EVAConfig):
        return EVA(cfg.method, backbone, _teacher_for(cfg, backbone))
    if isinstance(cfg.method, ITPNConfig):
        return ITPN(cfg.method, backbone)
    if isinstance(cfg.method, ITPNCLIPConfig):
        return ITPNCLIP(cfg.method, backbone, _teacher_for(cfg, backbone))
    if isinstance(cfg.method, DiGPTConfig):  # aligns per cluster itself: teacher grid kept
        return DiGPT(cfg.method, backbone, _teacher_for(cfg, backbone, resample=False))
    raise TypeError(f"no method for config {type(cfg.method).__name__}")


def build_method_backbone(cfg) -> nn.Module:
    """The module a method trains as ``method.backbone`` (weights ``backbone.*``), built
    without the rest of the method: the backbone, or for iTPN the backbone with its neck."""
    backbone = build_backbone(cfg.backbone)
    if isinstance(cfg.method, (ITPNConfig, ITPNCLIPConfig)):
        return pyramid_backbone(cfg.method, backbone)
    return backbone


def _teacher_for(cfg, backbone: nn.Module, resample: bool = True):
    """The frozen teacher of ``cfg.teacher``, aligned to ``backbone``'s patch grid (unless
    ``resample`` is False: then on its own grid)."""
    if cfg.teacher.kind == "none":
        pixels = ", pixels" if isinstance(cfg.method, DiGPTConfig) else ""
        raise ValueError(
            f"method {cfg.method.name} needs a frozen teacher: set teacher.kind (open_clip, "
            f"hf_clip, timm, mimar{pixels}) and its files, e.g. teacher.kind=mimar "
            "teacher.path=RUN_DIR"
        )
    if cfg.teacher.kind == "pixels" and not isinstance(cfg.method, DiGPTConfig):
        raise ValueError(
            "teacher.kind=pixels is D-iGPT's pixel-target ablation; "
            f"method {cfg.method.name} needs a feature teacher (open_clip, hf_clip, timm, mimar)"
        )
    mean, std = normalization_stats(cfg.data)
    return build_teacher(
        cfg.teacher,
        student_grid=getattr(backbone, "grid_size", backbone.img_size // backbone.patch_size),
        student_in_chans=backbone.in_chans,
        data_mean=mean,
        data_std=std,
        student_img_size=backbone.img_size,
        resample=resample,
    )
