"""The device a run uses and the precision it computes in: the one place that turns
``"auto"`` / ``"cuda"`` into a device and ``train.precision`` into an autocast context (the
training loop, evaluation, teachers and the speed report all use these)."""

from __future__ import annotations

import contextlib

import torch

from mimar.errors import ConfigError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; anything else as ``torch.device`` reads it.

    With ``local_rank`` (a training process) a plain ``"cuda"`` becomes this process's GPU,
    ``cuda:<local_rank>``, made the current device. A ConfigError for a CUDA device on a
    machine without CUDA.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name: bf16 -> bfloat16, fp16 -> float16, fp32 ->
    None (no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(
    device: str | torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def full_precision(device: str | torch.device) -> contextlib.AbstractContextManager:
    """fp32 inside an enclosing autocast (e.g. a teacher kept in fp32 under bf16 training)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)
