"""The dense model: a pretrained backbone, its feature pyramid, and a segmentation or detection
head; and how a pretraining run becomes one.

``backbone.*`` are the pretrained weights (layer decay reads ``backbone.layer_id``), ``neck.fpn.*``
the ViTDet pyramid or Swin's FPN and ``head.*`` the task head, both at the top layer-decay id.
For iTPN the pyramid is the backbone's own pretrained neck (``backbone.neck.*``, also at the top
id); ``neck="scratch"`` re-initialises exactly those weights (the paper's Table 5 ablation).
The backbone is the run's, with drop path, no mask token (unused downstream), a shared
relative position table copied per block, and the image size of the dense data (a ViT's
position table is resampled; HiViT resamples at run time; Swin builds its windows for it).
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
from torch import nn

from mimar import names
from mimar.dense.heads import DetectionHead, UPerNetHead, segmentation_loss, unpad_targets
from mimar.dense.necks import DensePyramid
from mimar.engine.contracts import MethodDefaults
from mimar.errors import ConfigError
from mimar.finetune.classifier import pretrained_weights
from mimar.loading import method_backbone

NECKS: tuple[str, ...] = ("pretrained", "scratch")


class DenseModel(MethodDefaults, nn.Module):
    """``forward(images, **targets)`` -> ``{"loss", ...}``; :meth:`predict` for evaluation:
    segment: ``(B, H, W)`` class indices; detect: torchvision's detections per image."""

    def __init__(self, backbone: nn.Module, task: str, num_classes: int, cfg) -> None:
        super().__init__()
        self.task, self.num_classes = task, num_classes
        self.backbone = backbone
        self.neck = DensePyramid(backbone, cfg.neck_dim)
        F = self.neck.out_dim
        if task == "segment":
            self.head = UPerNetHead(F, num_classes, cfg.decoder_dim, dropout=cfg.decoder_dropout)
        else:
            self.head = DetectionHead(self.neck.names, F, num_classes, cfg)

    def levels(self, images: torch.Tensor):
        return self.neck(self.backbone, images)

    def forward(self, images, semantic=None, boxes=None, box_labels=None) -> dict:
        levels = self.levels(images)
        if self.task == "segment":
            logits = self.head(list(levels.values()), images.shape[-2:])  # (B, K, H, W)
            loss = segmentation_loss(logits, semantic)
            return {"loss": loss}
        losses = self.head(levels, images.shape[-2:], unpad_targets(boxes, box_labels))
        return {"loss": sum(losses.values()), **losses}

    @torch.no_grad()
    def predict(self, images: torch.Tensor):
        levels = self.levels(images)
        if self.task == "segment":
            return self.head(list(levels.values()), images.shape[-2:]).argmax(1)  # (B, H, W)
        return self.head(levels, images.shape[-2:])


def dense_backbone_config(backbone_cfg, *, img_size: int, drop_path: float):
    """The pretraining backbone config as the dense model builds it (module docstring)."""
    names = {f.name for f in fields(backbone_cfg)}
    changes: dict = {"drop_path_rate": drop_path}
    if "use_mask_token" in names:
        changes["use_mask_token"] = False
    if getattr(backbone_cfg, "rel_pos_bias", "none") == "shared":
        changes["rel_pos_bias"] = "per_block"
    if backbone_cfg.name in ("vit", "swin") and img_size != backbone_cfg.img_size:
        changes["img_size"] = img_size
    return replace(backbone_cfg, **changes)


def check_neck(run_cfg, neck: str) -> None:
    """``neck="scratch"`` needs a method that pretrains a pyramid neck (iTPN)."""
    if neck not in NECKS:
        raise ConfigError(f"--neck must be one of {NECKS}, got {neck!r}")
    if neck == "scratch" and not names.entry("method", run_cfg.method.name).pyramid_neck:
        raise ConfigError(
            f"--neck scratch: a {run_cfg.method.name} {run_cfg.backbone.name} backbone has no "
            "pretrained pyramid neck to re-initialise (iTPN has one)"
        )


def build_dense_model(
    run_cfg,
    state: dict | None,
    task: str,
    dense,
    num_classes: int,
    *,
    img_size: int,
    neck: str = "pretrained",
) -> DenseModel:
    """The dense model of a pretraining run: with ``state`` (its checkpoint's ``model``) the
    backbone (and an iTPN neck, unless ``neck="scratch"``) starts from the pretrained weights;
    without, everything is at the random initialisation drawn by building it."""
    backbone_cfg = dense_backbone_config(
        run_cfg.backbone, img_size=img_size, drop_path=dense.drop_path
    )
    check_neck(run_cfg, neck)
    backbone = method_backbone(run_cfg, backbone_cfg)  # iTPN: HiViT + its pyramid neck
    if state is not None:
        weights = pretrained_weights(state, run_cfg.backbone, backbone)
        if neck == "scratch":
            weights = {k: v for k, v in weights.items() if not k.startswith("neck.")}
        missing, unexpected = backbone.load_state_dict(weights, strict=False)
        fresh = [k for k in missing if not k.endswith("relative_position_index")]
        fresh = [k for k in fresh if not (neck == "scratch" and k.startswith("neck."))]
        if fresh or unexpected:
            raise ConfigError(
                f"the pretrained backbone does not fit the dense one: missing {fresh}, "
                f"unexpected {unexpected}"
            )
    return DenseModel(backbone, task, num_classes, dense)
