"""Multi-head attention on ``F.scaled_dot_product_attention``: self- and cross-attention.

Masks follow SDPA: boolean (True = *allowed*) or additive float (0 / -inf, or any bias),
broadcastable to ``(B, heads, Nq, Nk)``: ``(Nq, Nk)``, ``(B, 1, Nq, Nk)``, ``(heads, Nq, Nk)``.

Both layers call :func:`attend`, which picks the kernel (:func:`set_attention_kernel`,
``train.attention_kernel``): ``auto`` runs the plain matmul-softmax-matmul for bf16/fp16
training on CPU and ``F.scaled_dot_product_attention`` everywhere else; ``sdpa`` / ``matmul``
force one. Measured on the 2-core Sapphire Rapids CPU (tiny ViT classification step, batch 128,
one thread, steps interleaved; ``python -m benchmarks.attention_kernel``): bf16 with SDPA
974 ms, with SDPA's math backend 598 ms, with the matmul path 421 ms (SDPA's CPU flash
backward in bf16 is several times its fp32 time); fp32 905 ms matmul vs 935 ms SDPA, a tie,
so fp32 and inference keep SDPA. Rows that a mask hides entirely give NaN on the matmul path
(SDPA gives zeros); no method here builds such a mask (tests/test_attention_kernel.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mimar.nn.fused import linear


class Attention(nn.Module):
    """Self-attention with a fused ``qkv`` projection (timm names ``qkv``, ``proj``).

    ``rel_pos_bias`` (optional): this layer's own relative position bias module, called as
    ``rel_pos_bias(pos_ids)`` and added to the logits (BEiT's per-block table).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        rel_pos_bias: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rel_pos_bias = rel_pos_bias

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x (B, N, D)``; ``pos_ids (B, n)``: the patch ids of the patch tokens, for the
        relative position bias only (None: every patch, row-major)."""
        if self.rel_pos_bias is not None:
            attn_mask = additive_mask(attn_mask, self.rel_pos_bias(pos_ids))
        B, N, D = x.shape
        qkv = linear(x, self.qkv).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, D/heads)
        x = attend(q, k, v, attn_mask)
        return linear(x.transpose(1, 2).reshape(B, N, D), self.proj)


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``x`` over a separate ``memory`` (SDPA), with a mask."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, Nq, D = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, Nq, h, D // h).transpose(1, 2)  # (B, h, Nq, D/h)
        kv = self.kv(memory).reshape(B, memory.shape[1], 2, h, D // h)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, h, Nk, D/h)
        x = attend(q, k, v, attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, Nq, D))


Kernel = Literal["auto", "sdpa", "matmul"]
_kernel: Kernel = "auto"


def set_attention_kernel(kernel: Kernel) -> Kernel:
    """Choose the attention kernel of every :func:`attend` call; returns the previous choice."""
    global _kernel
    if kernel not in ("auto", "sdpa", "matmul"):
        raise ValueError(f"attention kernel must be auto, sdpa or matmul, got {kernel!r}")
    previous, _kernel = _kernel, kernel
    return previous


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` for ``q (B, h, Nq, d)``, ``k, v (B, h, Nk, d)``."""
    attn_mask = _match_dtype(attn_mask, q)
    if kernel_for(q) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, Nq, Nk)
    if attn_mask is not None:
        # Added, not masked_fill-ed: the backward of an add passes the gradient through, that of
        # masked_fill is one more pass over the logits. Same values; AIM's tiny bf16 step with
        # its per-image (B, 1, N, N) mask 314 -> 275 ms (one thread, interleaved), D-iGPT's
        # shared mask unchanged.
        logits = logits + _additive(attn_mask, logits.dtype)
    # the CPU softmax accumulates bf16 inputs in fp32, as SDPA's kernels do
    return logits.softmax(-1) @ v


def kernel_for(q: torch.Tensor) -> Literal["sdpa", "matmul"]:
    """The kernel :func:`attend` runs for queries ``q`` under the current choice."""
    if _kernel != "auto":
        return _kernel
    low_precision = q.dtype in (torch.bfloat16, torch.float16)
    training = torch.is_grad_enabled() and q.requires_grad
    return "matmul" if q.device.type == "cpu" and low_precision and training else "sdpa"


def additive_mask(attn_mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """One additive float mask from an SDPA mask (bool True = allowed, or float) and a bias.

    A boolean mask becomes 0 where allowed and ``-inf`` elsewhere, then ``bias`` (e.g. a
    relative position bias ``(heads, N, N)`` or ``(B, heads, N, N)``) is added.
    """
    if attn_mask is None:
        return bias
    return _additive(attn_mask.to(bias.device), bias.dtype) + bias


def _additive(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = allowed) as 0 / -inf in ``dtype``; a float mask as it is."""
    if attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(
        ~attn_mask, float("-inf")
    )


def _match_dtype(attn_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    # SDPA wants a float mask in the query's dtype (bf16 under autocast); bool masks pass as is
    if attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.dtype == q.dtype:
        return attn_mask
    return attn_mask.to(q.dtype)
