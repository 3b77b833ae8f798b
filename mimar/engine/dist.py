"""torch.distributed plumbing: ranks from torchrun's environment, DDP on gloo or NCCL."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def init(device_kind: str) -> tuple[int, int, int]:
    """Join the process group when launched by torchrun; return (rank, world, local_rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        timeout = timedelta(minutes=30)
        store = _attempt_store(world, timeout)
        if store is None:  # env:// as usual
            dist.init_process_group(backend, timeout=timeout)
        else:
            rank = int(os.environ["RANK"])  # torchrun sets it with the shared store
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timeout)  # fmt: skip
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _attempt_store(world: int, timeout: timedelta) -> dist.Store | None:
    """The rendezvous store, with keys of their own for each torchrun restart.

    torchrun's agent hosts one store for the whole job and (torch 2.14) hands it to every
    restarted worker group without a per-attempt prefix, so a restarted rank can read the
    address a killed rank published and fail in gloo's connect ("Connection refused").
    None outside torchrun's shared store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"mimar/attempt_{attempt}/", store)


def initialized() -> bool:
    return dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (identity on one process)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is set on any rank (so every rank stops at the same step)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
