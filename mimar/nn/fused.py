"""Linear layers with their bias (and GELU) fused into oneDNN's matmul, for CPU inference.

A tiny ViT's inference on a CPU is bound by its element-wise passes, not its matmuls: at width
128 the GELU after ``fc1`` and the bias copies of ``addmm`` took ~25 % of a forward. oneDNN's
matmul applies bias and GELU (erf, as ``nn.GELU``) to its fp32 accumulators on the fly;
PyTorch reaches it through ``torch.ops.mkldnn._linear_pointwise``, the op that inductor
emits for CPU linears. Measured on the 2-core Sapphire Rapids CPU, demo ViT in bf16, one
thread, batch 64, interleaved: 786 images/s unfused, 1040 with only the MLP fused; the whole
feature extraction on 2 cores 1914 -> 2183 images/s (``python -m benchmarks.eval_speed``).

Only inside :func:`fused_inference` (feature extraction turns it on), on CPU tensors, with
autograd off; everywhere else :func:`linear` is ``layer(x)`` (then GELU), so training and
the teachers inside pretraining keep their numbers. In bf16 the fused path rounds once after
GELU instead of before and after it: features differ by about one bf16 step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

_enabled = False
_bf16 = False  # oneDNN has bf16 kernels on this CPU (checked once, on entering the block)


@contextlib.contextmanager
def fused_inference(enabled: bool = True) -> Iterator[None]:
    """Let :func:`linear` use the fused oneDNN kernels inside this block (process-wide, so
    worker threads see it too)."""
    global _enabled, _bf16
    previous, _enabled = _enabled, enabled and _available()
    _bf16 = _enabled and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    try:
        yield
    finally:
        _enabled = previous


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(x)``, then exact GELU when ``gelu``; fused on the CPU inside
    :func:`fused_inference` when autograd is off, in the autocast dtype (else ``x``'s)."""
    if not (_enabled and x.device.type == "cpu" and not torch.is_grad_enabled()):
        y = layer(x)
        return F.gelu(y) if gelu else y
    cpu_autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if cpu_autocast else x.dtype
    if dtype == torch.bfloat16 and not _bf16:
        y = layer(x)  # a CPU without bf16 instructions: oneDNN would refuse
        return F.gelu(y) if gelu else y
    bias = None if layer.bias is None else layer.bias.to(dtype)
    attr, algorithm = ("gelu", "none") if gelu else ("none", "")
    return torch.ops.mkldnn._linear_pointwise(
        x.to(dtype), layer.weight.to(dtype), bias, attr, [], algorithm
    )


def _available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
