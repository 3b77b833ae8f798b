"""Small layers: LayerScale, and DropPath whose masks follow the training step.

:class:`DropPath` is timm's stochastic depth (per sample, ``x * bernoulli(keep) / keep``) with
its masks drawn differently: inside :func:`step_draws` (the engine enters it for every
micro-batch with a seed derived from (run seed, step)) each call draws the mask of the
*global* batch from the seeded global RNG and keeps this rank's rows, so masks are a pure
function of (seed, step): exact on resume and the same with 1 or N processes. timm's draws
from each process's RNG for its own rows only, which differs per rank. The global RNG (not a
private generator) is used so that activation checkpointing, which restores it before
recomputing a block, recomputes the same masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.utils.checkpoint
from torch import nn

_ranks: tuple[int, int] = (0, 1)  # (rank, world size) of the draws


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` (CaiT; timm name ``gamma``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


@contextlib.contextmanager
def step_draws(seed: int, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """Seed the global RNG with ``seed``; within it every :class:`DropPath` in training mode
    draws ``B * world_size`` uniforms per call and uses rows ``rank * B`` to ``(rank + 1) * B``."""
    global _ranks
    torch.manual_seed(seed)
    previous, _ranks = _ranks, (rank, world_size)
    try:
        yield
    finally:
        _ranks = previous


class DropPath(nn.Module):
    """Drop the whole residual branch of a sample with probability ``drop_prob`` (training)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep, b = 1.0 - self.drop_prob, x.shape[0]
        rank, world = _ranks
        u = torch.rand(b * world)[rank * b : (rank + 1) * b]  # CPU draws: the same on any device
        mask = (u.to(x.device) < keep).to(x.dtype) / keep  # (B,)
        return x * mask.view(b, *[1] * (x.ndim - 1))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ChannelDropout(nn.Module):
    """``nn.Dropout2d`` (zero whole channels of a sample, scale the rest by ``1 / (1 - p)``)
    whose draws follow :func:`step_draws` like :class:`DropPath`: ``B * world_size`` rows per
    call, this rank's slice kept, so a multi-process step equals a 1-process one."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, ...)
        if self.p == 0.0 or not self.training:
            return x
        keep, (b, c) = 1.0 - self.p, x.shape[:2]
        rank, world = _ranks
        u = torch.rand(b * world, c)[rank * b : (rank + 1) * b]  # CPU draws
        mask = (u.to(x.device) < keep).to(x.dtype) / keep  # (B, C)
        return x * mask.view(b, c, *[1] * (x.ndim - 2))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def replace_drop_paths(module: nn.Module) -> nn.Module:
    """Swap timm's ``DropPath`` modules (e.g. inside timm's Swin) for :class:`DropPath`."""
    from timm.layers import DropPath as TimmDropPath

    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, TimmDropPath):
                setattr(parent, name, DropPath(child.drop_prob))
    return module


class GradCheckpointing:
    """Activation checkpointing of a backbone's blocks (``train.grad_checkpointing``): each
    block's activations are recomputed in the backward pass instead of kept (timm's
    ``set_grad_checkpointing`` name). Drop-path masks recompute identically (see above)."""

    grad_checkpointing: bool = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def run_block(self, block: nn.Module, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)
