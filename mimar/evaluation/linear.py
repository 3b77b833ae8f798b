"""Linear probing on frozen features: a grid of heads, one per learning rate, in one pass.

Following DINOv2 (Oquab et al., 2023, arXiv:2304.07193, ``eval/linear.py``) every candidate
learning rate gets its own linear head and all heads train together on the same minibatches,
so the features are read once per step for all R heads. The lr is chosen on a held-out slice
of the train features and the chosen head is scored on the test set.

One matmul per step: the R weights ``(D, C)`` are stacked to ``(D, R, C)`` and flattened, so a
single GEMM ``(B, D) @ (D, R * C)`` gives every head's logits. This is the same computation as a
batched matmul over an ``(R, D, C)`` stack but measured ~20% faster per step on CPU (the probe is
launch-overhead bound: ~0.6 ms/step for 4 heads, D=192, C=10, B=256 on 2 cores).

Per-head learning rates: the R heads are one ``(R, D, C)`` weight and one ``(R, C)`` bias,
updated by AdamW by hand (:class:`_AdamW`) with a vector of R learning rates: exact AdamW
semantics per head (decoupled weight decay ``lr * wd``), without one optimizer call per head.
The loss is the sum of the R per-head mean cross-entropies; heads share no parameters, so
each head receives exactly the gradient of its own loss.

Deviations from DINOv2: AdamW instead of SGD with momentum (less sensitive to the lr grid on
unnormalised features; we standardise anyway), and the chosen head is not retrained on
train + val, to keep it simple.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimar.engine.optim import lr_at
from mimar.errors import ConfigError

_EVAL_CHUNK = 8192  # rows per batched matmul when scoring heads


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    epochs: int = 100,
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2),
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    val_fraction: float = 0.1,
    device: str | torch.device = "cpu",
) -> dict:
    """Train one linear head per lr on standardised features; report the best on val.

    A seeded random ``val_fraction`` of the train rows is held out to pick the lr; the heads
    train on the rest only (no retraining on the full train set afterwards). Features are
    standardised with the mean/std of that training part. Heads start at zero and train with
    AdamW, a per-step cosine schedule to 0, and minibatch cross-entropy, on ``device``.

    Returns:
        ``{"top1": test percent of the chosen head, "best_lr", "val_top1": {lr: percent},
        "epochs"}``. Ties in val accuracy go to the smaller lr (first in ``lrs``).
    """
    if not lrs or epochs < 1 or batch_size < 1 or not 0.0 < val_fraction < 1.0:
        raise ConfigError("need non-empty lrs, epochs >= 1, batch_size >= 1, 0 < val_fraction < 1")
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels must have equal lengths")
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    train_feats, train_labels = train_feats.to(device, torch.float32), train_labels.to(device)
    test_feats, test_labels = test_feats.to(device, torch.float32), test_labels.to(device)
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    fit_idx, val_idx = _split(len(train_feats), val_fraction, generator)
    x_fit = train_feats[fit_idx]  # (N_fit, D)
    mean = x_fit.mean(dim=0)  # (D,)
    std = x_fit.std(dim=0).clamp_min(1e-6)  # (D,) guard constant features
    x_fit = (x_fit - mean) / std
    x_val = (train_feats[val_idx] - mean) / std  # (N_val, D)
    x_test = (test_feats - mean) / std  # (M, D)

    weight, bias = _train_heads(
        x_fit, train_labels[fit_idx], num_classes, lrs, epochs, weight_decay, batch_size, generator
    )
    val_acc = _accuracy(weight, bias, x_val, train_labels[val_idx])  # (R,)
    best = int(val_acc.argmax())  # first maximum -> smallest lr on ties
    test_acc = _accuracy(weight[best : best + 1], bias[best : best + 1], x_test, test_labels)
    return {
        "top1": float(test_acc[0]),
        "best_lr": lrs[best],
        "val_top1": {lr: float(acc) for lr, acc in zip(lrs, val_acc, strict=True)},
        "epochs": epochs,
    }


def _split(n: int, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Seeded random split into (fit, val) row indices; both parts non-empty."""
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise ConfigError(f"val_fraction={val_fraction} of {n} train rows leaves an empty part")
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:], perm[:n_val]


def _train_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs: tuple[float, ...],
    epochs: int,
    weight_decay: float,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train R = len(lrs) heads together; returns weights (R, D, C) and biases (R, C).

    The probe is launch-bound (~0.6 ms a step), so a step is as few kernels as it can be: the
    bias is one more weight row against a column of ones, the gradient is written out instead
    of autograd, targets are one-hot rows and minibatches are slices of one gather per epoch.
    `python -m benchmarks.eval_speed --probes` (30 epochs, 60k x 128, 4 heads, 2 cores; the
    same accuracies): 5.76 s with autograd and two tensors per step, 3.26 s so.
    """
    num_heads, dim = len(lrs), x.shape[1]
    ones = torch.ones(len(x), 1, device=x.device)
    x = torch.cat([x, ones], dim=1)  # (N, D + 1): the last weight row is the bias
    targets = F.one_hot(y, num_classes).float()[:, None, :]  # (N, 1, C)
    param = torch.zeros(dim + 1, num_heads * num_classes, device=x.device)  # (D + 1, R * C)
    decay = torch.full((dim + 1, 1, 1), weight_decay, device=x.device)
    decay[dim] = 0.0  # no decay on biases
    adamw = _AdamW(param.view(dim + 1, num_heads, num_classes), decay)
    peak = torch.tensor(lrs, device=x.device).view(1, num_heads, 1)  # each head's own lr
    total = epochs * math.ceil(len(x) / batch_size)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for xb, tb in zip(x[perm].split(batch_size), targets[perm].split(batch_size), strict=True):
            logits = (xb @ param).unflatten(1, (num_heads, -1))  # (B, R, C)
            # The loss is the sum over heads of each head's mean cross-entropy over the B
            # rows: d loss / d logits[b, r] = (softmax(logits[b, r]) - onehot(y_b)) / B.
            g = logits.softmax(dim=-1).sub_(tb).div_(len(xb)).flatten(1)  # (B, R * C)
            lr = peak * lr_at(step, 1.0, total, 0)  # (1, R, 1) the cosine to 0, per step
            step += 1
            adamw.update((xb.T @ g).view(dim + 1, num_heads, -1), lr, step)
    heads = param.view(dim + 1, num_heads, num_classes).transpose(0, 1)  # (R, D + 1, C)
    return heads[:, :dim].contiguous(), heads[:, dim].contiguous()


class _AdamW:
    """torch.optim.AdamW's update (decoupled decay, bias corrections, eps outside the root) of
    one tensor whose heads (dim 1) each have their own lr and whose rows (dim 0) each have
    their own weight decay.

    By hand instead of one AdamW param group per head and per decay: the 2R groups cost 2R
    optimizer calls per step and the probe is launch-bound (7.4 s with param groups, 5.4 s by
    hand, before the rest of the step was trimmed). Adam is invariant to gradient scale, so
    one tensor with scaled gradients would not do.
    """

    def __init__(self, param: torch.Tensor, decay: torch.Tensor, betas=(0.9, 0.999), eps=1e-8):
        self.param, self.decay, self.betas, self.eps = param, decay, betas, eps
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    def update(self, grad: torch.Tensor, lr: torch.Tensor, step: int) -> None:
        b1, b2 = self.betas
        if self.decay.any():
            self.param.mul_(1 - lr * self.decay)
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**step)).add_(self.eps)
        self.param.sub_(lr / (1 - b1**step) * self.m / denom)


@torch.no_grad()
def _accuracy(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """Top-1 percent of each of the R heads on (x, y); returns (R,)."""
    correct = torch.zeros(len(weight))
    for xc, yc in zip(x.split(_EVAL_CHUNK), y.split(_EVAL_CHUNK), strict=True):
        logits = xc @ weight + bias[:, None]  # (R, b, C)
        correct += (logits.argmax(dim=-1).cpu() == yc.cpu()).sum(dim=1)
    return 100.0 * correct / max(len(y), 1)
