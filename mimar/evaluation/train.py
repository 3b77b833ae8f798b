"""The one training loop of the trained evaluation protocols (linear, attentive probe, LoRA).

AdamW over the caller's parameter groups, the engine's per-step schedule
(:func:`mimar.engine.optim.lr_at`: optional linear warm-up, then half-cosine to 0) as a factor
on every group's own lr, and epochs of seeded random minibatches of ``range(n)``. The caller
supplies the step as a function of the minibatch's row indices, so the probes keep their own
data handling (pre-extracted features, the linear probe's multi-head GEMM, LoRA's image
view) and share everything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mimar.engine.optim import lr_at


def fit(
    step_loss: Callable[[torch.Tensor], torch.Tensor],
    param_groups: Iterable[dict],
    n: int,
    *,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    lr: float = 1e-3,
    warmup_steps: int = 0,
    fused: bool | None = None,
    module: nn.Module | None = None,
) -> list[float]:
    """Minimise ``step_loss(idx)`` over ``epochs`` passes of minibatches of ``range(n)``.

    Args:
        step_loss: row indices ``(B,)`` (CPU, long) -> scalar loss of that minibatch.
        param_groups: AdamW groups; a group without ``"lr"`` uses ``lr``.
        n: rows per epoch; each epoch is one ``torch.randperm(n, generator=generator)`` cut
            into ``ceil(n / batch_size)`` minibatches (the last one may be short).
        generator: the minibatch order; ``step_loss`` may draw from it too (LoRA's flips),
            after the epoch's permutation.
        warmup_steps: linear warm-up steps before the cosine (0: cosine from the first step).
        fused: passed to AdamW (True: one kernel for all parameters).
        module: put in train mode while training, in eval mode afterwards.

    Returns:
        The mean loss of every epoch.
    """
    optimizer = torch.optim.AdamW(param_groups, lr=lr, fused=fused)
    total_steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, 1.0, total_steps, warmup_steps)
    )
    if module is not None:
        module.train()
    epoch_losses = []
    # inference_mode(False)/enable_grad: callers may hold us inside no_grad or inference mode.
    with torch.inference_mode(False), torch.enable_grad():
        for _ in range(epochs):
            losses = []
            for idx in torch.randperm(n, generator=generator).split(batch_size):
                loss = step_loss(idx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.detach())
            values = torch.stack(losses).tolist()  # one host sync per epoch, not per step
            epoch_losses.append(sum(values) / len(values))
    if module is not None:
        module.eval()
    return epoch_losses
