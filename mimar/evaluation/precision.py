"""Where evaluation runs and in which precision: the device choice and the autocast context."""

from __future__ import annotations

import contextlib

import torch

from mimar.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as ``torch.device`` reads it.

    Raises ValueError for a CUDA device on a machine without CUDA.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a run's ``train.precision``: bf16 -> bfloat16, fp32 -> None."""
    return torch.bfloat16 if precision == "bf16" else None


def autocast(
    device: str | torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
