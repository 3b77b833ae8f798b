"""Robustness of a classifier to ImageNet-C-style corruptions (Hendrycks & Dietterich, ICLR
2019, arXiv:1903.12261) and small geometric shifts: top-1 on the clean test set and on every
corruption x severity of :mod:`mimar.evaluation.corruptions` (how they are made and why they
are written here). ``mean_corruption_top1`` averages over types and severities (the paper's mCE
further divides by AlexNet's errors, which we do not have). Pictures of the results:
:mod:`mimar.evaluation.robustness_plots`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from mimar.data.augment import eval_transform
from mimar.data.image_set import ImageSet
from mimar.errors import ConfigError
from mimar.evaluation.corruptions import CORRUPTIONS, IMPLEMENTATION, SEVERITIES, corrupt


def evaluate_robustness(
    classify: Callable[[torch.Tensor], torch.Tensor],
    images: ImageSet,
    *,
    img_size: int,
    batch_size: int,
    seed: int = 0,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Top-1 (%) of ``classify`` on the clean test set and on every corruption x severity.

    Each batch is corrupted as uint8 at the stored resolution, then turned into the eval view
    (``eval_transform``: resize, centre crop, normalise) exactly like the clean images.

    Args:
        classify: normalised float ``(B, C, img_size, img_size)`` on ``device`` -> logits
            ``(B, K)``; called under ``torch.inference_mode`` (put a model in eval mode first).
        images: the labelled test split.
        img_size, batch_size: the eval view's side and the batch size.
        seed: fixes the corruptions' random draws (see :func:`corrupt`).
        corruptions, severities: which types (names in :data:`CORRUPTIONS`) and levels (1-5).
        device: where ``classify`` runs; corruption itself runs on the CPU.
        progress: show a rich progress bar with ETA over corruption x severity.

    Returns:
        ``{"clean_top1", "mean_corruption_top1" (mean over types and severities),
        "per_corruption": {name: {"1": top1, ..., "5": top1, "mean": top1}}, "n_test",
        "seed", "severities", "implementation"}``.
    """
    _check_request(images, corruptions, severities)
    jobs = [("clean", 0)] + [(c, s) for c in corruptions for s in severities]
    top1: dict[tuple[str, int], float] = {}
    columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("robustness", total=len(jobs))
        for name, severity in jobs:
            bar.update(task, description=f"robustness: {name} {severity}")
            top1[name, severity] = _top1(
                classify, images, name, severity, seed, img_size, batch_size, device
            )
            bar.advance(task)
    per_corruption = {}
    for name in corruptions:
        row = {str(s): top1[name, s] for s in severities}
        per_corruption[name] = {**row, "mean": sum(row.values()) / len(row)}
    means = [per_corruption[name]["mean"] for name in corruptions]
    return {
        "clean_top1": top1["clean", 0],
        "mean_corruption_top1": sum(means) / len(means),
        "per_corruption": per_corruption,
        "n_test": len(images),
        "seed": seed,
        "severities": list(severities),
        "implementation": IMPLEMENTATION,
    }


def _check_request(images: ImageSet, corruptions: Sequence[str], severities: Sequence[int]):
    if images.labels is None:
        raise ValueError(f"{images.source or 'the test set'} has no labels")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown or not corruptions:
        raise ConfigError(f"unknown corruptions {unknown}; choose from {list(CORRUPTIONS)}")
    if not severities or any(s not in SEVERITIES for s in severities):
        raise ConfigError(f"severities must be a non-empty subset of 1-5, got {severities}")


def _top1(classify, images: ImageSet, name, severity, seed, img_size, batch_size, device):
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            rows = images.images[start : start + batch_size]  # (B, C, H, W) uint8
            if severity:
                index = torch.arange(start, start + len(rows))
                rows = corrupt(rows, name, severity, seed, indices=index)
            view = eval_transform(rows, img_size, images.mean, images.std)  # (B, C, S, S)
            logits = classify(view.to(device))  # (B, K)
            labels = images.labels[start : start + batch_size]  # type: ignore[index]
            correct += int((logits.argmax(dim=-1).cpu() == labels).sum())
    return 100.0 * correct / max(len(images), 1)
