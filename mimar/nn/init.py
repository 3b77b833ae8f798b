"""Weight initialisation: the one helper every part uses, with the papers' variants as args."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


@torch.no_grad()
def trunc_normal_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> torch.Tensor:
    """Fill ``tensor`` with a normal(``mean``, ``std``) truncated to ``[a, b]`` (absolute
    bounds), in place, by the inverse-CDF method: uniform on ``[2 F(a) - 1, 2 F(b) - 1]``
    (F the normal CDF of the standardised bound), ``erfinv``, scale by ``std * sqrt(2)``,
    shift by ``mean``, clamp to ``[a, b]``.

    The draws of ``timm.layers.trunc_normal_`` (the same method; tests/test_init.py pins
    equality), written here so that building a ViT does not import timm (~2.5 s of every
    command's start-up on 2 cores: timm imports torchvision and torch._dynamo). Not
    ``torch.nn.init.trunc_normal_``: PyTorch 2.14 samples it by rejection, other numbers.
    """

    def cdf(x: float) -> float:  # standard normal CDF
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = cdf((a - mean) / std), cdf((b - mean) / std)
    tensor.uniform_(2 * low - 1, 2 * high - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0)).add_(mean)
    return tensor.clamp_(min=a, max=b)


@torch.no_grad()
def init_linears(
    module: nn.Module,
    kind: Literal["trunc_normal", "xavier"] = "trunc_normal",
    *,
    std: float = 0.02,
    cutoff: float = 2.0,
    conv: bool = False,
    layer_norm: bool = False,
) -> None:
    """Re-initialise every ``nn.Linear`` inside ``module`` (itself included), in module order.

    Args:
        module: the module whose linears are initialised.
        kind: ``"trunc_normal"``: normal with ``std`` truncated to ``[-cutoff, cutoff]``
            (absolute values; the default 2.0 is timm's and PyTorch's, i.e. in effect
            untruncated at std 0.02; SimMIM/EVA cut at one std, ``cutoff=std``, docs/METHODS.md
            §10.7-8). ``"xavier"``: xavier-uniform on the ``(out, fan_in)`` view of the weight
            (MAE/AIM/D-iGPT).
        std: standard deviation of ``"trunc_normal"``.
        cutoff: absolute truncation bound of ``"trunc_normal"``.
        conv: also ``nn.Conv2d`` weights, treated like a linear layer on the flattened kernel.
        layer_norm: also reset ``nn.LayerNorm`` to weight 1, bias 0.

    Biases of the initialised layers are set to zero.
    """
    if kind not in ("trunc_normal", "xavier"):
        raise ValueError(f"init kind must be trunc_normal or xavier, got {kind!r}")
    types = (nn.Linear, nn.Conv2d) if conv else (nn.Linear,)
    for m in module.modules():
        if isinstance(m, types):
            if kind == "xavier":
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            else:
                trunc_normal_(m.weight, std=std, a=-cutoff, b=cutoff)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif layer_norm and isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def xavier_uniform_split_(weight: torch.Tensor, chunks: int) -> None:
    """Xavier-uniform each of ``chunks`` equal row blocks of ``weight`` as its own matrix.

    A fused ``qkv`` weight ``(3D, D)`` initialised as three ``(D, D)`` blocks gets the bound
    ``sqrt(6 / 2D)`` of separate q, k, v projections instead of ``sqrt(6 / 4D)``.
    """
    for block in weight.chunk(chunks, dim=0):
        nn.init.xavier_uniform_(block)


@torch.no_grad()
def default_bias_(layer: nn.Linear | nn.Conv2d) -> None:
    """PyTorch's own bias init of a Linear / Conv: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    fan_in = layer.weight[0].numel()
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(layer.bias, -bound, bound)
