"""Attentive probe of AIM: one learned query cross-attends to frozen patch tokens.

El-Nouby et al., "Scalable Pre-training of Large Autoregressive Image Models", 2024,
arXiv:2401.08541, §4 "attentive probing"; the head transcribes ml-aim's
``AttentionPoolingClassifier`` (``aim-v1/aim/v1/torch/layers.py`` at commit 37621213,
docs/METHODS.md §5.6).

Glossary: ``query`` = the learnable ``cls_token`` of ml-aim (used as q directly, no q
projection); ``k``/``v`` = its key/value projections (no bias); ``norm`` = its parameter-free
BatchNorm over the channels of every token; ``linear`` = its classifier.

The classifier has no bias (``linear_bias=False`` in ml-aim now, and docs/METHODS.md §5.6).
An earlier ml-aim (``aim/torch/layers.py`` at commit 1eaedecc) built it as
``nn.Linear(dim, out_features)``, i.e. with a bias: ``classifier_bias=True`` gives that variant.

The probe *training* recipe is not in the public code (docs/METHODS.md §5.6 "UNVERIFIED"). Ours:
AdamW (lr 1e-3, betas (0.9, 0.999), weight decay 0.05 on the k/v/classifier weights, none on
the query and the bias, if any), per-step cosine decay to 0 without warmup, minibatch cross-entropy,
no augmentation (the features are pre-extracted once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mimar.errors import ConfigError
from mimar.evaluation.train import fit

_EVAL_CHUNK = 1024  # test rows per forward when scoring


class AttentivePooler(nn.Module):
    """``(B, N, D)`` tokens -> ``(B, D)``: BatchNorm, then one query attends over the N tokens.

    Parameters: query D, k D², v D² -> ``2·D² + D``; the BatchNorm is affine-free (running
    mean/var are buffers, not parameters).
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attentive probe: {num_heads} heads do not divide width {dim}")
        self.num_heads = num_heads
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)  # ml-aim v1
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)  # ml-aim's cls_token init
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.num_heads
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)  # (B, N, D): stats over B·N tokens
        q = self.query.expand(B, -1, -1).reshape(B, 1, H, D // H).transpose(1, 2)  # (B,H,1,D/H)
        k = self.k(x).reshape(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        v = self.v(x).reshape(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        pooled = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, D/H), scale (D/H)^-1/2
        # Heads concatenated, no output projection; the mean over the (single) query is a no-op.
        return pooled.transpose(1, 2).reshape(B, D)  # (B, D)


class AttentiveClassifier(nn.Module):
    """:class:`AttentivePooler` + ``Linear(D, classes)``.

    Trainable parameters: ``2·D² + D + D·classes`` (+ ``classes`` with ``classifier_bias``,
    an earlier ml-aim); the BatchNorm adds none.
    """

    def __init__(
        self, dim: int, num_classes: int, num_heads: int, classifier_bias: bool = False
    ) -> None:
        super().__init__()
        self.pooler = AttentivePooler(dim, num_heads)
        self.linear = nn.Linear(dim, num_classes, bias=classifier_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooler(x))  # (B, classes)


def attentive_params(dim: int, num_classes: int, classifier_bias: bool = False) -> int:
    """The closed-form trainable parameter count of :class:`AttentiveClassifier`."""
    return 2 * dim * dim + dim + dim * num_classes + (num_classes if classifier_bias else 0)


def probe_heads(backbone: nn.Module) -> int:
    """Heads of the probe = heads of the trunk (ml-aim); Swin: those of its last stage."""
    heads = backbone.cfg.num_heads
    return heads[-1] if isinstance(heads, tuple) else int(heads)


def default_blocks(backbone: nn.Module, count: int = 3) -> tuple[int, ...]:
    """The last ``count`` taps of the final width (ml-aim "last" averages 6 of 24; our models
    are tiny): a ViT's or HiViT's last blocks; for Swin, whose taps are stages of different
    widths, the last stage only."""
    dims = backbone.layer_dims
    last = [i for i, d in enumerate(dims) if d == dims[-1]][-count:]
    return tuple(last)


def attentive_probe(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_heads: int,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    batch_size: int = 256,
    seed: int = 0,
    classifier_bias: bool = False,
    device: str | torch.device = "cpu",
) -> dict:
    """Train an :class:`AttentiveClassifier` on frozen tokens; score it on the test tokens.

    Args:
        train_tokens, test_tokens: ``(N, T, D)`` / ``(M, T, D)`` patch tokens (any float dtype;
            bf16 storage is fine, each minibatch is cast to float32 on ``device``).
        train_labels, test_labels: ``(N,)`` / ``(M,)`` integer labels.
        num_heads: attention heads (the trunk's, see :func:`probe_heads`).
        seed: seeds both the head's initialisation and the minibatch order.
        classifier_bias: a bias in the classifier (an earlier ml-aim; default: none, as now).

    Returns:
        ``{"top1": test percent, "train_top1", "params", "epochs", "lr", "weight_decay",
        "batch_size", "num_heads"}``.
    """
    if len(train_tokens) != len(train_labels) or len(test_tokens) != len(test_labels):
        raise ValueError("tokens and labels must have equal lengths")
    if epochs < 1 or batch_size < 1 or len(train_tokens) == 0:
        raise ConfigError("need epochs >= 1, batch_size >= 1 and some train tokens")
    device = torch.device(device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttentiveClassifier(train_tokens.shape[-1], num_classes, num_heads, classifier_bias)
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    _train(
        model, train_tokens, train_labels.long(), epochs, lr, weight_decay, batch_size, generator
    )
    return {
        "top1": _accuracy(model, test_tokens, test_labels),
        "train_top1": _accuracy(model, train_tokens, train_labels),
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "epochs": epochs,
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "num_heads": num_heads,
    }


def _train(model, x, y, epochs, lr, weight_decay, batch_size, generator) -> None:
    """Weight decay on matrices only (not the query, not the bias); see :func:`fit`."""
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim != 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]

    def step_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = x[idx].to(device, torch.float32)  # (B, T, D)
        return F.cross_entropy(model(xb), y[idx].to(device))

    fit(
        step_loss,
        groups,
        len(x),
        epochs=epochs,
        batch_size=batch_size,
        generator=generator,
        lr=lr,
        module=model,
    )


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 percent with the BatchNorm on its running statistics (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for xc, yc in zip(x.split(_EVAL_CHUNK), y.split(_EVAL_CHUNK)):
        logits = model(xc.to(device, torch.float32))  # (b, classes)
        correct += int((logits.argmax(dim=-1).cpu() == yc.cpu().long()).sum())
    return 100.0 * correct / max(len(y), 1)
