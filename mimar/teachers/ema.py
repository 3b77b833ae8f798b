"""The EMA teacher: an exponential moving average of (part of) the student, updated after every
optimizer step: ``teacher = m * teacher + (1 - m) * student`` with a constant momentum ``m``;
buffers are copied. iTPN's masked feature modeling uses it (docs/METHODS.md §4.7).

Not timm's ``ModelEmaV3`` (which fine-tuning uses), measured: (1) it updates with ``lerp``,
``t + (1 - m) * (s - t)``, which rounds differently from ``m * t + (1 - m) * s``: on a
64x64 Linear + LayerNorm, 3,327 of 4,288 weights differed (max 4.8e-7) after 10 updates at
m = 0.996, so iTPN's losses would change; (2) it holds the copy as ``.module``, so an iTPN
checkpoint's ``ema.*`` keys would become ``ema.module.*`` and old runs (file and DCP) would
need their keys mapped. Here the teacher *is* the copied module: the keys stay ``ema.*``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` (``requires_grad`` off: no optimizer sees it, it gets no
    gradient), to register as a submodule so that checkpoints carry it."""
    return copy.deepcopy(student).requires_grad_(False)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` for every parameter, in
    place; every buffer copied from the student."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)
