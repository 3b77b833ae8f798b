"""One optimizer step of the training loop: micro-batches, per-image draws, autocast,
gradient accumulation and sync, clipping, the update and the method's after-step."""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimar.engine import dist, fsdp
from mimar.engine.contracts import Method, StepLoader
from mimar.engine.precision import autocast, autocast_dtype
from mimar.nn.layers import step_draws


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


def train_step(
    model: nn.Module,
    method: Method,
    optimizer,
    loader: StepLoader,
    t,
    clip_grad: float | None,
    step: int,
    lr: float,
    device: torch.device,
    *,
    waits: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step over ``accum_steps`` micro-batches; returns its scalars as 0-d
    device tensors (averaged over ranks), read by the host only every ``log_every`` steps.
    ``model`` is ``method`` or its DDP / compiled wrapper; ``waits`` collects the seconds this
    rank waited for the loader's inputs."""
    rank, world = loader.rank, loader.world_size
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    model.train()
    totals: dict[str, torch.Tensor] = {}
    for micro in range(t.accum_steps):
        index = step * t.accum_steps + micro  # data position: a pure function of the step
        tic = time.perf_counter()
        inputs = {k: v.to(device, non_blocking=True) for k, v in loader.inputs(index).items()}
        if waits is not None:
            waits.append(time.perf_counter() - tic)
        # per-image draws for the *global* batch, this rank's rows sliced out
        drawn = method.sample_corruption(loader.batch_size, loader.generator_for(index))
        b = inputs["images"].shape[0]
        corruption = {k: v[rank * b : (rank + 1) * b].to(device) for k, v in drawn.items()}
        sync = _gradient_sync(model, micro == t.accum_steps - 1, world)
        seed = loader.generator_for(index, "network").initial_seed()
        with sync, autocast(device, autocast_dtype(t.precision)), step_draws(seed, rank, world):
            out = model(**inputs, **corruption)
            if "loss_terms" in out:
                out = _global_mean(out, world)
        with sync:
            (out["loss"] / t.accum_steps).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / t.accum_steps
    keys = list(totals)
    means = dist.all_reduce_mean(torch.stack([totals[k] for k in keys]))  # one collective
    totals = dict(zip(keys, means.unbind(), strict=True))
    if clip_grad:
        from torch.distributed.tensor import DTensor

        norm = nn.utils.clip_grad_norm_(method.parameters(), clip_grad)
        totals["grad_norm"] = norm.full_tensor() if isinstance(norm, DTensor) else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_step(step + 1)
    return totals


def _gradient_sync(model: nn.Module, last: bool, world: int):
    """A context for one micro-step: gradients are reduced over ranks on the last one only."""
    if world == 1:
        return nullcontext()
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if last else model.no_sync()
    fsdp.set_gradient_sync(model, last)
    return nullcontext()


def _global_mean(out: dict, world: int) -> dict:
    """A loss that averages a varying number of terms per rank (``loss_terms``: AIM's
    non-prefix patches) as the mean over the whole global batch: each rank's mean weighted
    by ``world * terms / all terms``, so that the ranks' average (what DDP and FSDP average
    gradients and logged values over) is the one-process loss of the same batch."""
    out = dict(out)
    terms = out.pop("loss_terms").detach().float()
    if world > 1:
        total = terms.clone()
        torch.distributed.all_reduce(total)
        out["loss"] = out["loss"] * (terms * world / total.clamp(min=1))
    return out


def read_window(window: list[dict], step: int) -> dict:
    """The last step's scalars as floats; NonFiniteLoss names the first step whose loss was
    not finite (the window ends at ``step``). One host transfer for the whole window."""
    keys = list(window[-1])
    values = torch.stack([torch.stack([out[k] for k in keys]) for out in window]).cpu()
    losses = values[:, keys.index("loss")]
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        first = int(bad[0])
        raise NonFiniteLoss(
            f"loss is {float(losses[first])} at step {step - len(window) + first + 1}: "
            "stopping; the last good checkpoint is kept (try a lower optim.lr, "
            "train.precision=fp32 or optim.clip_grad)"
        )
    return dict(zip(keys, values[-1].tolist(), strict=True))
