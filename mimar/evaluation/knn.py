"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of InstDisc (Wu et al., 2018, arXiv:1805.01978) as used by DINO (Caron et al.,
2021, arXiv:2104.14294, ``eval_knn.py``): cosine similarity between L2-normalised features,
the k most similar train samples vote for their class with weight ``exp(sim / temperature)``,
and the class with the largest summed weight wins. A small temperature lets the closest
neighbours dominate; a very large one tends to a plain majority vote.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Predicted class ``(M,)`` for each test row; see the module docstring for the vote.

    Test rows are processed ``chunk_size`` at a time, so memory is ``O(chunk_size * n_train)``.
    Ties between classes go to the smallest class index (``argmax``). Runs on ``device``
    (default: that of ``train_feats``) and returns the predictions there.
    """
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}")
    if len(train_feats) != len(train_labels) or len(train_feats) == 0:
        raise ValueError("train_feats and train_labels must be non-empty and of equal length")
    device = train_feats.device if device is None else torch.device(device)
    train_labels = train_labels.to(device).long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_feats))
    train = F.normalize(train_feats.to(device).float(), dim=1)  # (N, D)
    test = F.normalize(test_feats.float().to(train.device), dim=1)  # (M, D)

    preds = []
    for chunk in test.split(chunk_size):
        sim = chunk @ train.T  # (b, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()  # (b, k)
        votes = torch.zeros(len(chunk), num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # (b, num_classes)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
) -> dict:
    """Weighted kNN top-1 accuracy of ``test_feats`` against the ``train_feats`` memory bank.

    Args:
        train_feats, train_labels: ``(N, D)`` features and ``(N,)`` integer labels.
        test_feats, test_labels: ``(M, D)`` and ``(M,)``.
        k: neighbours per test sample (20 in DINO; capped at N).
        temperature: vote weight is ``exp(cosine / temperature)`` (0.07 in DINO).
        num_classes: defaults to ``max(label) + 1`` over train and test labels.
        chunk_size: test rows per similarity matrix.
        device: where the similarities are computed (default: that of ``train_feats``).

    Returns:
        ``{"top1": percent, "k", "temperature", "n_train", "n_test"}``.
    """
    if len(test_feats) != len(test_labels) or len(test_feats) == 0:
        raise ValueError("test_feats and test_labels must be non-empty and of equal length")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predict(
        train_feats,
        train_labels,
        test_feats,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
        device=device,
    )
    correct = (preds.cpu() == test_labels.cpu().long()).sum().item()
    return {
        "top1": 100.0 * correct / len(test_labels),
        "k": k,
        "temperature": temperature,
        "n_train": len(train_feats),
        "n_test": len(test_feats),
    }
