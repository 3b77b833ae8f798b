"""Dense heads over a 4-level pyramid: UPerNet for segmentation, Faster R-CNN for detection.

* :class:`UPerNetHead` — the decoder of Xiao et al., "Unified Perceptual Parsing for Scene
  Understanding", ECCV 2018 (arXiv:1807.10221), as the ADE20K transfer of BEiT, SimMIM, EVA
  and iTPN runs it (mmseg's ``UPerHead``): a pyramid pooling module (PSPNet, scales 1/2/3/6) on
  the coarsest level, FPN laterals + top-down sums, a 3x3 conv per level, every level
  upsampled to the finest and fused by a 3x3 conv, dropout, a 1x1 classifier, logits upsampled
  to the image. One change: GroupNorm instead of SyncBN, so statistics do not depend on how a
  batch is split (a DDP run equals a 1-process run) and batches of 2 still train.
* :class:`DetectionHead` — torchvision's Faster R-CNN parts (Ren et al., NeurIPS 2015; RPN,
  multi-scale RoIAlign, two-MLP box head, class + box predictor) run on our pyramid: no
  detector is written here, only which parts and with which anchors. Images are already
  normalised and of one size, so torchvision's resizing transform is not used.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from mimar.nn.layers import ChannelDropout

IGNORE = 255  # label of pixels no loss or metric counts


def conv_norm_act(dim: int, out_dim: int, kernel: int) -> nn.Sequential:
    """Conv (no bias) -> GroupNorm (32 groups, or fewer for narrow layers) -> ReLU."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if out_dim % g == 0)
    return nn.Sequential(
        nn.Conv2d(dim, out_dim, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(groups, out_dim),
        nn.ReLU(inplace=True),
    )


class UPerNetHead(nn.Module):
    """4 maps ``(B, F, h_i, w_i)`` finest first -> logits ``(B, K, H, W)`` at the image size."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 512,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.pool_scales = pool_scales
        self.ppm = nn.ModuleList(conv_norm_act(in_dim, dim, 1) for _ in pool_scales)
        self.bottleneck = conv_norm_act(in_dim + len(pool_scales) * dim, dim, 3)
        self.laterals = nn.ModuleList(conv_norm_act(in_dim, dim, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_norm_act(dim, dim, 3) for _ in range(3))
        self.fuse = conv_norm_act(4 * dim, dim, 3)
        self.dropout = ChannelDropout(dropout)  # Dropout2d, its draws per step and rank
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, levels: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        top = levels[-1]  # (B, F, h3, w3)
        pooled = [
            _resize(ppm(F.adaptive_avg_pool2d(top, s)), top.shape[-2:])
            for s, ppm in zip(self.pool_scales, self.ppm)
        ]
        maps = [lat(x) for lat, x in zip(self.laterals, levels[:-1])]
        maps.append(self.bottleneck(torch.cat([top, *pooled], 1)))  # (B, C, h3, w3)
        for i in range(len(maps) - 1, 0, -1):  # top-down
            maps[i - 1] = maps[i - 1] + _resize(maps[i], maps[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, maps[:-1])] + [maps[-1]]
        fine = outs[0].shape[-2:]
        x = self.fuse(torch.cat([outs[0]] + [_resize(o, fine) for o in outs[1:]], 1))
        return _resize(self.classifier(self.dropout(x)), size)  # (B, K, H, W)


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel cross-entropy ``(B, K, H, W)`` vs ``(B, H, W)``, mean over the non-ignored pixels."""
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE)


class DetectionHead(nn.Module):
    """torchvision's RPN + RoI heads on a named pyramid of width ``dim``.

    Training: ``forward(levels, image_size, targets)`` -> the four Faster R-CNN losses;
    eval: ``forward(levels, image_size)`` -> per image ``{"boxes", "labels", "scores"}``.
    """

    def __init__(self, names: tuple[str, ...], dim: int, num_classes: int, cfg) -> None:
        super().__init__()
        anchors = AnchorGenerator(
            sizes=tuple((s,) for s in cfg.anchor_sizes),
            aspect_ratios=(tuple(cfg.aspect_ratios),) * len(names),
        )
        self.rpn = RegionProposalNetwork(
            anchors,
            RPNHead(dim, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7,  # torchvision / Detectron2 defaults from here on
            bg_iou_thresh=0.3,
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_top_n={"training": 2000, "testing": 1000},
            post_nms_top_n={
                "training": cfg.rpn_post_nms_top_n_train,
                "testing": cfg.rpn_post_nms_top_n_test,
            },
            nms_thresh=0.7,
        )
        pool = MultiScaleRoIAlign(featmap_names=list(names), output_size=7, sampling_ratio=2)
        self.roi_heads = RoIHeads(
            pool,
            TwoMLPHead(dim * 7 * 7, cfg.box_head_dim),
            FastRCNNPredictor(cfg.box_head_dim, num_classes),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=cfg.box_batch_size_per_image,
            positive_fraction=0.25,
            bbox_reg_weights=None,
            score_thresh=0.05,
            nms_thresh=0.5,
            detections_per_img=cfg.detections_per_image,
        )

    def forward(self, levels: OrderedDict, image_size: tuple[int, int], targets=None):
        B = next(iter(levels.values())).shape[0]
        sizes = [tuple(image_size)] * B
        # the detector runs in fp32: box coding, RoIAlign and NMS are precision-sensitive
        with torch.autocast(next(iter(levels.values())).device.type, enabled=False):
            levels = OrderedDict((k, v.float()) for k, v in levels.items())
            images = ImageList(levels[next(iter(levels))].new_empty(B, 0, *image_size), sizes)
            proposals, rpn_losses = self.rpn(images, levels, targets)
            detections, box_losses = self.roi_heads(levels, proposals, sizes, targets)
        return detections if targets is None else {**rpn_losses, **box_losses}


def unpad_targets(boxes: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """Padded ``(B, M, 4)`` boxes and ``(B, M)`` labels (0 = padding) -> torchvision targets."""
    return [{"boxes": b[lab > 0], "labels": lab[lab > 0]} for b, lab in zip(boxes, labels)]
