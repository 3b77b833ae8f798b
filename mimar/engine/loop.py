"""The training loop: the same code on a laptop CPU and on many GPUs under torchrun.

Knows nothing about any method: a method is an ``nn.Module`` whose ``forward(images,
**corruption)`` returns a dict with ``loss``; it may offer ``sample_corruption(batch, gen)``
(per-image random draws, made here for the *global* batch from a generator seeded by the
step and sliced per rank, so that resume and multi-process runs are exact) and
``after_step()`` (EMA teachers). The run's picture is drawn by ``mimar.viz`` at the end,
imported only then.

Exact resume: data order, augmentation and corruption are pure functions of (seed, step);
the checkpoint carries model, optimizer, step and the global RNG (drop-path) state.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimar import runs
from mimar.config import PretrainConfig, save_config, to_dict
from mimar.data import build_step_loader, load_images
from mimar.engine import checkpoint, dist
from mimar.engine.logger import MetricsLog, ProgressBar
from mimar.engine.optim import build_optimizer, lr_at, scaled_lr, warmup_steps
from mimar.factory import build_method

log = logging.getLogger("mimar")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class RunResult:
    step: int
    stopped_by: str | None  # signal name when interrupted, else None


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def train(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False) -> RunResult:
    run_dir, t = Path(run_dir), cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    owns_group = not dist.initialized()  # torchrun workers: we join, so we also leave
    use_cuda = "cuda" in t.device or (t.device == "auto" and torch.cuda.is_available())
    rank, world, local_rank = dist.init("cuda" if use_cuda else "cpu")
    device = pick_device(t.device, local_rank)
    ckpt_path = runs.last_checkpoint(run_dir)
    state = checkpoint.load(ckpt_path) if resume else None
    if resume and rank == 0:
        log.info("resuming %s from step %d", run_dir, state["step"])

    torch.manual_seed(t.seed)
    method = build_method(cfg).to(device)
    images = load_images(cfg.data, "train")
    loader = build_step_loader(cfg.data, images, seed=t.seed, rank=rank, world_size=world)
    peak_lr = scaled_lr(cfg.optim, cfg.data.batch_size * t.accum_steps)
    optimizer = build_optimizer(method, cfg.optim, peak_lr)
    start = 0
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        start = state["step"]
    model = DistributedDataParallel(method) if world > 1 else method
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / runs.CONFIG)
        _describe(method, optimizer, images, peak_lr, world)

    stop = _StopFlag()
    metrics = MetricsLog(run_dir / runs.METRICS, start if resume else 0) if rank == 0 else None
    bar = ProgressBar(t.steps, start, t.progress and rank == 0)
    warmup = warmup_steps(cfg.optim, t.steps)
    step, save = start, _saver(cfg, method, optimizer, run_dir, rank)
    try:
        while step < t.steps:
            lr = lr_at(step, peak_lr, t.steps, warmup, cfg.optim.min_lr_ratio)
            tic = time.perf_counter()
            out = train_step(model, method, optimizer, loader, cfg, step, lr, device)
            step += 1
            row = {
                "step": step,
                "epoch": loader.epoch_of(step * t.accum_steps),
                "lr": lr,
                **out,
                "images_per_s": cfg.data.batch_size * t.accum_steps / (time.perf_counter() - tic),
            }
            if metrics is not None and (step % t.log_every == 0 or step == t.steps):
                metrics.write(row)
            bar.update(row)
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                save(step, periodic=True)
            if dist.any_rank(stop.signal is not None, device):
                save(step)
                return RunResult(step, stop.signal or "signal on another rank")
        save(step)
        if rank == 0:
            from mimar import viz  # here, not at the top: the engine itself draws nothing

            if viz.has_picture(method):
                viz.save_reconstruction(
                    method,
                    loader.batch(0)[:8].to(device),
                    run_dir / runs.PICTURE,
                    mean=images.mean,
                    std=images.std,
                    generator=loader.generator_for(0),
                )
        dist.barrier()  # every rank finished before any leaves the group
        return RunResult(step, None)
    finally:
        bar.close()
        stop.restore()
        if metrics is not None:
            metrics.close()
        if owns_group:  # a live gloo group at interpreter exit can abort the process
            dist.shutdown()


def train_step(
    model: nn.Module,
    method: nn.Module,
    optimizer,
    loader,
    cfg: PretrainConfig,
    step: int,
    lr: float,
    device: torch.device,
) -> dict:
    """One optimizer step over ``accum_steps`` micro-batches; returns scalars to log."""
    t, rank, world = cfg.train, loader.rank, loader.world_size
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if t.precision == "bf16"
        else nullcontext()
    )
    model.train()
    totals: dict[str, torch.Tensor] = {}
    for micro in range(t.accum_steps):
        index = step * t.accum_steps + micro  # data position: a pure function of the step
        images = loader.batch(index).to(device, non_blocking=True)
        corruption = {}
        if hasattr(method, "sample_corruption"):
            drawn = method.sample_corruption(cfg.data.batch_size, loader.generator_for(index))
            b = images.shape[0]
            corruption = {k: v[rank * b : (rank + 1) * b].to(device) for k, v in drawn.items()}
        last = micro == t.accum_steps - 1
        sync = nullcontext() if last or world == 1 else model.no_sync()
        with sync, autocast:
            out = model(images, **corruption)
        with sync:
            (out["loss"] / t.accum_steps).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / t.accum_steps
    totals = {k: dist.all_reduce_mean(v) for k, v in totals.items()}
    loss = totals["loss"].item()
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(
            f"loss is {loss} at step {step + 1}: stopping; the last good checkpoint is kept "
            "(try a lower optim.lr, train.precision=fp32 or optim.clip_grad)"
        )
    grad_norm = None
    if cfg.optim.clip_grad:
        grad_norm = nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(method, "after_step"):
        method.after_step(step + 1)
    row = {k: v.item() for k, v in totals.items()}
    if grad_norm is not None:
        row["grad_norm"] = grad_norm
    return row


def _saver(cfg, method, optimizer, run_dir: Path, rank: int):
    def save(step: int, periodic: bool = False) -> None:
        if rank != 0:
            return
        state = {
            "model": method.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            },
            "config": to_dict(cfg),
            "git_sha": checkpoint.git_sha(),
        }
        checkpoint.save_atomic(state, runs.last_checkpoint(run_dir))
        if periodic:
            checkpoint.save_atomic(state, runs.step_checkpoint(run_dir, step))

    return save


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint after the current step."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _describe(method, optimizer, images, peak_lr: float, world: int) -> None:
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    log.info("data: %s", images.source)
    log.info(
        "model: %s, %.2fM trainable parameters, %d process(es)",
        type(method).__name__,
        trainable / 1e6,
        world,
    )
    log.info("peak lr %.3g; optimizer groups:", peak_lr)
    for g in optimizer.param_groups:
        log.info(
            "  weight_decay=%g lr_scale=%.3g: %d tensors (%s ...)",
            g["weight_decay"],
            g["lr_scale"],
            len(g["params"]),
            ", ".join(g["names"][:3]),
        )
