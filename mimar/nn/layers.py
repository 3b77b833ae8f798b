"""Small layers: LayerScale, and DropPath whose masks follow the training step.

:class:`DropPath` is timm's stochastic depth (per sample, ``x * bernoulli(keep) / keep``) with
its masks drawn differently: inside :func:`step_draws` (the engine enters it for every
micro-batch) each call draws the mask of the *global* batch from the step's generator and keeps
this rank's rows, so masks are a pure function of (seed, step): exact on resume and the same
with 1 or N processes. timm's draws from each process's global RNG, which differs per rank.
Outside :func:`step_draws` (a bare module in a notebook) it draws from the global RNG.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_draws: tuple[torch.Generator, int, int] | None = None  # (generator, rank, world size)


class LayerScale(nn.Module):
    """Per-channel learnable scale ``x * gamma`` (CaiT; timm name ``gamma``)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


@contextlib.contextmanager
def step_draws(generator: torch.Generator, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """Within it, every :class:`DropPath` in training mode draws ``B * world_size`` uniforms
    from ``generator`` (CPU) per call and uses rows ``rank * B`` to ``(rank + 1) * B``."""
    global _draws
    previous, _draws = _draws, (generator, rank, world_size)
    try:
        yield
    finally:
        _draws = previous


class DropPath(nn.Module):
    """Drop the whole residual branch of a sample with probability ``drop_prob`` (training)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep, b = 1.0 - self.drop_prob, x.shape[0]
        if _draws is None:
            u = torch.rand(b, device=x.device)
        else:
            generator, rank, world = _draws
            u = torch.rand(b * world, generator=generator)[rank * b : (rank + 1) * b]
        mask = (u.to(x.device) < keep).to(x.dtype) / keep  # (B,)
        return x * mask.view(b, *[1] * (x.ndim - 1))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def replace_drop_paths(module: nn.Module) -> nn.Module:
    """Swap timm's ``DropPath`` modules (e.g. inside timm's Swin) for :class:`DropPath`."""
    from timm.layers import DropPath as TimmDropPath

    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, TimmDropPath):
                setattr(parent, name, DropPath(child.drop_prob))
    return module
