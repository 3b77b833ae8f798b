"""The training loop: the same code on a laptop CPU and on many GPUs under torchrun.

Knows nothing about any method or task: it is handed a :class:`~mimar.engine.contracts.Method`
(an ``nn.Module`` whose ``forward(**inputs, **corruption)`` returns ``loss`` and scalars to
log) and a :class:`~mimar.engine.contracts.StepLoader` (this rank's inputs of any step), and
periodic work as :class:`~mimar.engine.hooks.Hook` s. Restoring a run is
:func:`mimar.engine.checkpoint.restore`, saving it a :class:`~mimar.engine.saver.Saver`, its
folder :func:`mimar.engine.logger.open_run`. Pretraining, fine-tuning and dense runs all go
through :func:`fit`.

Exact resume: data order, augmentation, corruption and drop-path masks are pure functions of
(seed, step), the same for any number of processes; the checkpoint carries model, optimizer,
step and the global RNG state, and hooks run inside a forked RNG.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimar import runs
from mimar.engine import checkpoint, dist, fsdp
from mimar.engine.contracts import StepLoader
from mimar.engine.hooks import Hook, StepView
from mimar.engine.logger import ProgressBar, Run, RunLog, describe_run, open_run
from mimar.engine.optim import build_optimizer, lr_at, scaled_lr, warmup_steps
from mimar.engine.precision import resolve_device
from mimar.engine.saver import saver_for
from mimar.engine.signals import StopFlag
from mimar.engine.step import NonFiniteLoss, read_window, train_step
from mimar.errors import ConfigError
from mimar.nn.attention import set_attention_kernel
from mimar.nn.layers import GradCheckpointing

__all__ = ["Hook", "NonFiniteLoss", "Run", "RunResult", "Session", "StepView", "fit", "train_step"]
log = logging.getLogger("mimar")


@dataclass
class RunResult:
    step: int
    stopped_by: str | None  # signal name when interrupted, else None
    # the trained model, whole on rank 0 (under FSDP over several ranks: rank 0's unsharded
    # copy; other ranks get their shards): what pictures and evaluations after the run use
    model: nn.Module | None = None


class Session:
    """The process's place in the run: threads, process group (torchrun or one process),
    device and attention kernel. Enter it before building the model and the loader, which
    need rank and world."""

    def __init__(self, train_cfg) -> None:
        self.cfg = train_cfg

    def __enter__(self) -> Session:
        t = self.cfg
        if t.threads:
            torch.set_num_threads(t.threads)
        self.owns_group = not dist.initialized()  # torchrun workers: we join, so we leave
        use_cuda = "cuda" in t.device or (t.device == "auto" and torch.cuda.is_available())
        self.rank, self.world, local_rank = dist.init("cuda" if use_cuda else "cpu")
        self.device = resolve_device(t.device, local_rank)
        self.previous_kernel = set_attention_kernel(t.attention_kernel)
        return self

    def __exit__(self, *exc) -> None:
        set_attention_kernel(self.previous_kernel)
        if self.owns_group:  # a live gloo group at interpreter exit can abort the process
            dist.shutdown()


def fit(
    session: Session,
    model: nn.Module,
    loader: StepLoader,
    *,
    train,
    optim,
    run: Run,
    hooks: Sequence[Hook] = (),
) -> RunResult:
    """Train ``model`` for ``train.steps`` optimizer steps (AdamW by ``optim``, warm-up +
    cosine) into the run folder ``run``; ``hooks`` run on rank 0 after the steps they ask
    for (engine/hooks.py: their numbers are logged, their pictures go to the loggers)."""
    t, device, rank = train, session.device, session.rank
    # one process trains into a folder (RUN/.lock; a no-op when the caller holds it already)
    took_lock = runs.lock_run(run.dir) if rank == 0 else False
    p = _Parts(session, model, loader, t, optim, run)
    metrics = open_run(run, t.loggers, p.start) if rank == 0 else None
    if rank == 0:
        describe_run(p.model, p.optimizer, loader, p.peak_lr, session.world)
    stop, saver = (
        StopFlag(),
        saver_for(run.dir, run.config, p.model, p.optimizer, p.sharded, device),
    )
    bar = ProgressBar(t.steps, p.start, t.progress and rank == 0, run.name)
    warmup, step = warmup_steps(optim, t.steps), p.start
    try:
        window, waits, tic = [], [], time.perf_counter()  # since the last read of the device
        while step < t.steps:
            lr = lr_at(step, p.peak_lr, t.steps, warmup, optim.min_lr_ratio)
            out = train_step(p.wrapped, p.model, p.optimizer, loader, t, optim.clip_grad, step,
                             lr, device, waits=waits)  # fmt: skip
            if t.compile and step == p.start and rank == 0:
                log.info("train.compile: the first step took %.1fs", time.perf_counter() - tic)
            step += 1
            window.append(out)
            due = [h for h in hooks if h.due(step, t.steps)]
            periodic = t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps
            # The host reads the device only here: every log_every steps, before a hook or a
            # checkpoint, and at the end (GPUs run ahead in between).
            if not (step % t.log_every == 0 or step == t.steps or due or periodic):
                continue
            seconds = time.perf_counter() - tic  # the window's steps (not hooks or saves)
            images = len(window) * loader.batch_size * t.accum_steps
            row = {"step": step, "epoch": loader.epoch_of(step * t.accum_steps), "lr": lr,
                   **read_window(window, step),  # NonFiniteLoss before anything is saved
                   "images_per_s": images / seconds, "step_s": seconds / len(window),
                   "data_wait_s": sum(waits) / len(window)}  # fmt: skip
            window, waits = [], []
            due = [h for h in hooks if h.every == 0 or h in due]  # row hooks: every row
            extra = _run_hooks(due, StepView(step, t.steps, p.model, row, run.dir), p, metrics)
            if metrics is not None:
                metrics.write(row)
                if extra:
                    metrics.write({"step": step, "epoch": row["epoch"], **extra})
            bar.update(row)
            if periodic:
                saver.save(step, periodic=True)
            if dist.any_rank(stop.signal is not None, device):
                saver.save(step)
                return RunResult(step, stop.signal or "signal on another rank", p.model)
            tic = time.perf_counter()
        saver.save(step)
        dist.barrier()  # every rank finished before any leaves the group
        return RunResult(step, None, p.whole())
    finally:
        saver.wait()  # an asynchronous save still in flight
        bar.close()
        stop.restore()
        if metrics is not None:
            metrics.close()
        if took_lock:
            runs.unlock_run(run.dir)


class _Parts:
    """The trained model on its device (sharded under FSDP, checkpointed blocks, restored),
    its optimizer and the wrapper that runs the steps (DDP, torch.compile)."""

    def __init__(self, session: Session, model: nn.Module, loader, t, optim, run: Run) -> None:
        self.device, self.sharded = session.device, t.strategy == "fsdp"
        self.sharding = self.sharded and session.world > 1
        self.model = model = _placed(model, t, session.device)
        # rank 0 keeps an unsharded copy for hooks and the result (every rank gathers into it)
        self.replica = copy.deepcopy(model) if self.sharding and session.rank == 0 else None
        if self.sharding:
            fsdp.shard(model, t.precision, session.device)
        self.peak_lr = scaled_lr(optim, loader.batch_size * t.accum_steps)
        self.optimizer = build_optimizer(model, optim, self.peak_lr)
        self.start = checkpoint.restore(
            run.dir, model, self.optimizer, resume=run.resume, sharded=self.sharded,
            device=session.device,
        )  # fmt: skip
        ddp = session.world > 1 and not self.sharded
        self.wrapped = DistributedDataParallel(model) if ddp else model
        if t.compile:  # compiled lazily, at the first step (its time is logged)
            self.wrapped = _compiled(self.wrapped, session.device)

    def whole(self) -> nn.Module:
        """The whole model on rank 0 (every rank calls it: under FSDP they gather it)."""
        if self.sharding:
            full = fsdp.full_model_state(self.model)
            if self.replica is not None:
                self.replica.load_state_dict(full)
        return self.replica if self.replica is not None else self.model


def _run_hooks(due: list[Hook], view: StepView, parts: _Parts, metrics: RunLog | None) -> dict:
    """Run the ``due`` hooks on rank 0 (after every rank gathered the model, when one needs
    it) in a forked RNG. Numbers of row hooks (``every=0``) join ``view.row``; the others'
    are returned, pictures go to the loggers."""
    if not due:
        return {}
    if any(h.needs_model for h in due):
        view.model = parts.whole()
    extra: dict = {}
    if metrics is not None:  # rank 0
        cuda = [parts.device] if parts.device.type == "cuda" else []  # and the CPU RNG
        for hook in due:
            with torch.random.fork_rng(devices=cuda):
                out = hook.fn(view)
            for key, value in (
                {"picture": out} if isinstance(out, os.PathLike) else out or {}
            ).items():
                if isinstance(value, os.PathLike):  # a picture, alone or among the numbers
                    metrics.picture(value, view.step)
                else:
                    (view.row if hook.every == 0 else extra)[key] = value
    dist.barrier()  # the other ranks wait here for rank 0's hooks
    return extra


def _placed(model: nn.Module, t, device: torch.device) -> nn.Module:
    """``model`` on ``device``, its backbones' blocks checkpointed with grad_checkpointing."""
    model = model.to(device)
    if t.grad_checkpointing:
        backbones = [m for m in model.modules() if isinstance(m, GradCheckpointing)]
        if not backbones:
            raise ConfigError(
                f"train.grad_checkpointing: {type(model).__name__} holds no backbone that can "
                "checkpoint its blocks"
            )
        for backbone in backbones:
            backbone.set_grad_checkpointing(True)
    return model


def _compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile(model)``; on a CPU inductor builds C++ kernels: refuse early, in one
    line, when there is no compiler to build them with."""
    compiler = os.environ.get("CXX", "g++")
    if device.type == "cpu" and shutil.which(compiler) is None:
        raise ConfigError(
            f"train.compile on a CPU needs a C++ compiler ({compiler} not found): install one "
            "(apt-get install g++) or set train.compile=false"
        )
    return torch.compile(model)
