"""Dense metrics from torchmetrics: mIoU / pixel accuracy, and COCO box AP.

mIoU as mmseg reports it for ADE20K: per class ``TP / (TP + FP + FN)`` over the whole test set
(one confusion matrix, not a mean of per-image scores), averaged over the classes that occur
in the ground truth or the predictions; ignored pixels (255) count nowhere. Box AP is COCO's
(torchmetrics ``MeanAveragePrecision`` on pycocotools): AP over IoU 0.5:0.95, AP50, AP75.
"""

from __future__ import annotations

import torch

from mimar.dense.heads import IGNORE
from mimar.errors import MimarError

try:
    from torchmetrics.classification import MulticlassConfusionMatrix
    from torchmetrics.detection import MeanAveragePrecision
except ImportError:  # an optional extra: say how to get it, in one line
    raise MimarError("dense metrics need torchmetrics: pip install 'mimar[dense]'") from None

# Rank 0 scores the whole test set alone: torchmetrics must not gather from the other ranks
# (it would by default under torchrun, and wait for them forever).
LOCAL = {"sync_on_compute": False}


class SegmentationScore:
    """Accumulate ``update(pred (B, H, W), target (B, H, W))``; :meth:`compute` -> percentages."""

    def __init__(self, num_classes: int) -> None:
        self.matrix = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE, **LOCAL)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.matrix.update(pred.cpu().long(), target.cpu().long())

    def compute(self) -> dict:
        m = self.matrix.compute().double()  # (K, K): rows truth, columns prediction
        tp, truth, predicted = m.diag(), m.sum(1), m.sum(0)
        union = truth + predicted - tp
        iou = tp / union  # nan for classes in neither
        present = union > 0
        return {
            "miou": 100 * iou[present].mean().item(),
            "pixel_accuracy": 100 * (tp.sum() / m.sum()).item(),
            "iou_per_class": [
                None if not p else round(100 * v, 2) for v, p in zip(iou.tolist(), present.tolist())
            ],
        }


class BoxScore:
    """Accumulate ``update(detections, targets)`` (torchvision dicts); -> AP, AP50, AP75 (%)."""

    def __init__(self) -> None:
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", **LOCAL)

    def update(self, detections: list[dict], targets: list[dict]) -> None:
        self.metric.update(
            [
                {
                    k: d[k].detach().float().cpu() if k != "labels" else d[k].cpu()
                    for k in ("boxes", "scores", "labels")
                }
                for d in detections
            ],
            [{"boxes": t["boxes"].float().cpu(), "labels": t["labels"].cpu()} for t in targets],
        )

    def compute(self) -> dict:
        res = self.metric.compute()
        return {
            "ap": 100 * res["map"].item(),
            "ap50": 100 * res["map_50"].item(),
            "ap75": 100 * res["map_75"].item(),
        }
