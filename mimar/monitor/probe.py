"""The online probe: a fixed labelled subset through the current backbone, kNN and health.

The subsets are drawn once, by their own seed (:data:`SUBSET_SEED`, never the training RNG
streams), and kept for the whole run, resumes included: the bank (``train.monitor_bank``
training images, the kNN memory and the health metrics) and the queries
(``train.monitor_queries`` test images). Features come from
:func:`mimar.evaluation.features.extract_features` with ``mimar eval knn``'s defaults (final
normed tokens, mean of the patch tokens, batches of 256, the run's precision) and the vote is
:func:`mimar.evaluation.knn.knn_classify` with k = 20: on the same subsets and weights the
number is the one ``mimar eval knn`` prints.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from mimar.data import ImageSet, iterate_eval_batches
from mimar.engine.precision import autocast_dtype
from mimar.evaluation.features import extract_features
from mimar.evaluation.knn import knn_classify
from mimar.monitor.health import collapse_warning, feature_std, rankme

log = logging.getLogger("mimar")

SUBSET_SEED = 20230  # the subsets' own generator: independent of train.seed and its streams
EVAL_BATCH = 256  # mimar eval's --batch-size default: the same batches, the same numbers
EVAL_K = 20  # mimar eval's --k default (DINO)


def fixed_subset(images: ImageSet, n: int, seed: int = SUBSET_SEED) -> ImageSet:
    """``n`` images of ``images`` drawn once by ``seed`` (all when there are fewer), in
    their stored order."""
    if n >= len(images):
        return images
    gen = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(images), generator=gen)[:n].sort().values
    labels = None if images.labels is None else images.labels[keep].clone()
    source = f"{images.source}, {n} drawn by seed {seed} (train.monitor)"
    return replace(images, images=images.images[keep].clone(), labels=labels, source=source)


class OnlineProbe:
    """Scores of the current backbone on the fixed subsets: ``monitor/knn_top1`` (when the
    data has labels and ``knn`` is asked for), ``monitor/rankme`` and ``monitor/feature_std``
    (``rankme``), and once, for a method with a teacher, ``monitor/teacher_rankme``.

    Args:
        bank: training images (the kNN memory, and what the health metrics read).
        queries: test images the kNN classifies (None: health metrics only).
        probes: the names of ``train.monitor``.
        img_size: the eval view's side (``data.img_size``).
        precision: the run's ``train.precision`` (features under the same autocast).
        device: where the backbone lives.
    """

    def __init__(
        self,
        bank: ImageSet,
        queries: ImageSet | None,
        probes: tuple[str, ...],
        img_size: int,
        precision: str,
        device: torch.device,
    ) -> None:
        self.bank, self.img_size, self.device = bank, img_size, device
        labelled = bank.labels is not None and queries is not None and queries.labels is not None
        self.queries = queries if labelled and "knn" in probes else None
        self.health = "rankme" in probes
        self.dtype = autocast_dtype(precision)
        self.teacher_done = False
        if "knn" in probes and self.queries is None:
            log.info("monitor: the data has no labels: health metrics only (no online kNN)")

    def features(self, backbone: nn.Module, images: ImageSet) -> torch.Tensor:
        """``(N, D)`` pooled features, exactly as ``mimar eval knn`` extracts them."""
        batches = iterate_eval_batches(images, self.img_size, EVAL_BATCH)
        feats, _ = extract_features(
            backbone, batches, device=self.device, autocast_dtype=self.dtype
        )
        return feats

    def __call__(self, method: nn.Module, step: int) -> dict:
        backbone = method.backbone
        out: dict = {}
        bank = self.features(backbone, self.bank)  # (N, D)
        if self.queries is not None:
            queries = self.features(backbone, self.queries)  # (M, D)
            res = knn_classify(
                bank, self.bank.labels, queries, self.queries.labels, k=EVAL_K, device=self.device
            )
            out["monitor/knn_top1"] = res["top1"]
        if self.health:
            out["monitor/rankme"] = rankme(bank)
            out["monitor/feature_std"] = feature_std(bank)
            if (warning := collapse_warning(out["monitor/rankme"], step)) is not None:
                log.warning(warning)
            if not self.teacher_done:
                self.teacher_done = True
                teacher = self.teacher_rankme(method)
                if teacher is not None:
                    out["monitor/teacher_rankme"] = teacher
        return out

    def teacher_rankme(self, method: nn.Module) -> float | None:
        """RankMe of the frozen teacher's mean patch feature on the bank (None: no teacher).
        An EMA teacher starts as the student: its number is the student's."""
        teacher = getattr(method, "teacher", None)
        if teacher is None or isinstance(teacher, nn.Module) or not callable(teacher):
            return None
        feats = []
        with torch.inference_mode():
            for images, _ in iterate_eval_batches(self.bank, self.img_size, EVAL_BATCH):
                out = teacher(images.to(self.device))
                tokens = out["tokens"] if isinstance(out, dict) else out  # (B, N, D_t)
                feats.append(tokens.float().mean(dim=1).cpu())  # (B, D_t)
        return rankme(torch.cat(feats))
