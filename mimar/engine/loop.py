"""The training loop: the same code on a laptop CPU and on many GPUs under torchrun.

Knows nothing about any method or task. It is handed a built ``nn.Module`` whose
``forward(**inputs, **corruption)`` returns a dict with ``loss`` (and scalars to log), and a
step loader whose ``inputs(step)`` are this rank's rows of the global batch (``images``, and
``targets`` for supervised steps) and whose ``generator_for(step, stream)`` seeds the step's
draws. The module may offer ``sample_corruption(batch, gen)``
(per-image random draws, made here for the *global* batch from a generator seeded by the
step and sliced per rank, so that resume and multi-process runs are exact) and
``after_step()`` (EMA teachers or EMA weights). Pretraining (``mimar.pretrain``) and
fine-tuning (``mimar.finetune``) both run through :func:`fit`.

Exact resume: data order, augmentation, corruption and drop-path masks are pure functions of
(seed, step), the same for any number of processes; the checkpoint carries model, optimizer,
step and the global RNG state.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimar import runs, writes
from mimar.engine import checkpoint, dist, fsdp
from mimar.engine.logger import ProgressBar, RunLog, describe_run
from mimar.engine.optim import build_optimizer, lr_at, scaled_lr, warmup_steps
from mimar.errors import CheckpointError, ConfigError
from mimar.nn.attention import set_attention_kernel
from mimar.nn.layers import step_draws

log = logging.getLogger("mimar")

CONFIG_CHANGES = "config_changes.jsonl"  # RUN/: changes a resume was forced to accept


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class RunResult:
    step: int
    stopped_by: str | None  # signal name when interrupted, else None
    # the trained model, whole on rank 0 (under FSDP over several ranks: rank 0's unsharded
    # copy; other ranks get their shards): what pictures and evaluations after the run use
    model: nn.Module | None = None


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


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
        self.device = pick_device(t.device, local_rank)
        self.previous_kernel = set_attention_kernel(t.attention_kernel)
        return self

    def __exit__(self, *exc) -> None:
        set_attention_kernel(self.previous_kernel)
        if self.owns_group:  # a live gloo group at interpreter exit can abort the process
            dist.shutdown()


def fit(
    session: Session,
    model: nn.Module,
    loader,
    *,
    optim,
    train,
    run_dir: str | Path,
    config: dict,
    resume: bool = False,
    evaluate: Callable[[nn.Module, int], dict] | None = None,
    evaluate_every: int = 0,
    picture: Callable[[nn.Module, int], Path | None] | None = None,
    name: str = "pretrain",
    config_changes: list[dict] | None = None,
) -> RunResult:
    """Train ``model`` for ``train.steps`` optimizer steps with AdamW (``optim``: lr or base_lr
    scaled by the global batch, weight decay rules, layer decay, clipping) and the warm-up +
    cosine schedule; write ``config`` (a plain dict) as ``config.yaml``, metrics and
    checkpoints into ``run_dir``. ``evaluate(model, step)`` (rank 0) returns scalars logged
    every ``evaluate_every`` steps and after the last one. ``picture(model, step)`` (rank 0)
    draws a PNG and returns its path (or None); it runs every ``train.picture_every`` steps
    and the picture goes to the loggers (``train.loggers``). ``config_changes`` (a resume's
    ``{"key", "old", "new"}`` rows the caller allowed) are appended, with the step, to
    ``config_changes.jsonl``."""
    run_dir, t, device, rank = Path(run_dir), train, session.device, session.rank
    # One process trains into a folder (RUN/.lock; a no-op when the caller holds it already);
    # released in the finally below (an error before it: when the process ends).
    took_lock = runs.lock_run(run_dir) if rank == 0 else False
    sharded = t.strategy == "fsdp"
    if rank == 0:  # temp files of a save that was killed halfway
        fsdp.restore_interrupted(run_dir / runs.CHECKPOINTS)
        checkpoint.remove_orphans(run_dir / runs.CHECKPOINTS)
    dist.barrier()  # no rank looks for the checkpoint while rank 0 tidies
    last = runs.last_sharded(run_dir) if sharded else runs.last_checkpoint(run_dir)
    state = None
    if resume and not sharded:
        state = checkpoint.load(last, require=checkpoint.RESUME_KEYS)
    elif resume and not fsdp.is_sharded_checkpoint(last):
        raise CheckpointError(
            f"train.strategy=fsdp resumes from {last}, which is missing"
            + (
                " (this run has checkpoints/last.pt: resume it with train.strategy=ddp)"
                if runs.last_checkpoint(run_dir).is_file()
                else ""
            )
        )
    model = model.to(device)
    if t.grad_checkpointing:
        _checkpoint_blocks(model)
    # FSDP over several ranks: rank 0 keeps an unsharded copy for pictures and evaluations,
    # which run on rank 0 alone and cannot gather the other ranks' shards.
    sharding = sharded and session.world > 1
    wants_view = evaluate is not None or picture is not None
    replica = copy.deepcopy(model) if sharding and wants_view and rank == 0 else None
    if sharding:
        fsdp.shard(model, t.precision, device)
    peak_lr = scaled_lr(optim, loader.batch_size * t.accum_steps)
    optimizer = build_optimizer(model, optim, peak_lr)
    start = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:  # e.g. another backbone width
            problems = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
            detail = problems[0] if problems else str(err).strip()
            if len(problems) > 1:
                detail += f" (and {len(problems) - 1} more)"
            raise CheckpointError(
                f"{last} does not fit the model of the config: {detail}"
            ) from None
    elif resume:  # a DCP folder, saved by any number of ranks, loaded into this rank's shards
        state = fsdp.load_into(last, model, optimizer)
    if state is not None:
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        start = state["step"]
        if rank == 0:
            log.info("resuming %s from step %d", run_dir, start)
    wrapped = DistributedDataParallel(model) if session.world > 1 and not sharded else model
    if t.compile:  # compiled lazily, at the first step (its time is logged)
        wrapped = _compiled(wrapped, device)
    if rank == 0:
        writes.make_dir(run_dir, "run folder")
        writes.write_text(run_dir / runs.CONFIG, yaml.safe_dump(config, sort_keys=False))
        for c in config_changes or ():  # a forced resume: what changed, from which step on
            writes.append_line(run_dir / CONFIG_CHANGES, json.dumps({"step": start, **c}))
        describe_run(model, optimizer, loader, peak_lr, session.world)

    stop = _StopFlag()
    metrics = RunLog(run_dir, t.loggers, config, start if resume else 0) if rank == 0 else None
    bar = ProgressBar(t.steps, start, t.progress and rank == 0, name)
    warmup = warmup_steps(optim, t.steps)
    step = start
    save = _saver(config, model, optimizer, run_dir, rank, sharded, device)

    def view() -> nn.Module:  # every rank calls it: the whole model, on rank 0
        if replica is not None or sharding:
            full = fsdp.full_model_state(model)
            if replica is not None:
                replica.load_state_dict(full)
        return replica if replica is not None else model

    try:
        window: list[dict] = []  # this rank's step outputs (device tensors) since the last read
        tic = time.perf_counter()
        while step < t.steps:
            lr = lr_at(step, peak_lr, t.steps, warmup, optim.min_lr_ratio)
            out = train_step(
                wrapped, model, optimizer, loader, t, optim.clip_grad, step, lr, device
            )
            if t.compile and step == start and rank == 0:
                log.info("train.compile: the first step took %.1fs", time.perf_counter() - tic)
            step += 1
            window.append(out)
            every = evaluate_every and step % evaluate_every == 0
            periodic = t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps
            draw = picture is not None and t.picture_every and step % t.picture_every == 0
            # The host reads the device only here: every log_every steps, before an evaluation,
            # a picture or a checkpoint, and at the end (GPUs run ahead in between).
            if not (step % t.log_every == 0 or step == t.steps or every or periodic or draw):
                continue
            values = _read(window, step)  # raises NonFiniteLoss before anything is saved
            seconds = time.perf_counter() - tic  # the window's steps (not evals or saves)
            row = {
                "step": step,
                "epoch": loader.epoch_of(step * t.accum_steps),
                "lr": lr,
                **values,
                "images_per_s": len(window) * loader.batch_size * t.accum_steps / seconds,
            }
            window = []
            if metrics is not None:
                metrics.write(row)
            bar.update(row)
            if evaluate is not None and (every or step == t.steps):
                whole = view()
                scores = evaluate(whole, step) if rank == 0 else {}
                if metrics is not None:
                    metrics.write({"step": step, "epoch": row["epoch"], **scores})
                dist.barrier()
            if draw:
                whole = view()
                if rank == 0:
                    with writes.optional("picture"):  # a picture never stops training
                        if (path := picture(whole, step)) is not None:
                            metrics.picture(path, step)
                dist.barrier()
            if periodic:
                save(step, periodic=True)
            if dist.any_rank(stop.signal is not None, device):
                save(step)
                return RunResult(step, stop.signal or "signal on another rank", model)
            tic = time.perf_counter()
        save(step)
        dist.barrier()  # every rank finished before any leaves the group
        return RunResult(step, None, view() if wants_view else model)
    finally:
        if isinstance(save, _ShardedSave):
            save.saver.wait()  # an asynchronous save still in flight
        bar.close()
        stop.restore()
        if metrics is not None:
            metrics.close()
        if took_lock:
            runs.unlock_run(run_dir)


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


def _checkpoint_blocks(model: nn.Module) -> None:
    """Switch on activation checkpointing in every backbone of ``model`` that offers it."""
    backbones = [m for m in model.modules() if hasattr(m, "set_grad_checkpointing")]
    if not backbones:
        raise ConfigError(
            f"train.grad_checkpointing: {type(model).__name__} holds no backbone that can "
            "checkpoint its blocks"
        )
    for backbone in backbones:
        backbone.set_grad_checkpointing(True)


def _read(window: list[dict], step: int) -> dict:
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


def train_step(
    model: nn.Module,
    method: nn.Module,
    optimizer,
    loader,
    t,
    clip_grad: float | None,
    step: int,
    lr: float,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One optimizer step over ``accum_steps`` micro-batches; returns its scalars as 0-d
    device tensors (averaged over ranks), read by the host only every ``log_every`` steps.
    ``model`` is ``method`` or its DDP wrapper."""
    rank, world = loader.rank, loader.world_size
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
        inputs = {k: v.to(device, non_blocking=True) for k, v in loader.inputs(index).items()}
        corruption = {}
        if hasattr(method, "sample_corruption"):
            drawn = method.sample_corruption(loader.batch_size, loader.generator_for(index))
            b = inputs["images"].shape[0]
            corruption = {k: v[rank * b : (rank + 1) * b].to(device) for k, v in drawn.items()}
        last = micro == t.accum_steps - 1
        sync = _gradient_sync(model, last, world)
        seed = loader.generator_for(index, "network").initial_seed()
        draws = step_draws(seed, rank, world)  # drop path masks
        with sync, autocast, draws:
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
        norm = nn.utils.clip_grad_norm_(method.parameters(), clip_grad)
        totals["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(method, "after_step"):
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


def _saver(config: dict, method, optimizer, run_dir: Path, rank: int, sharded: bool, device):
    if sharded:
        return _ShardedSave(config, method, optimizer, run_dir, rank)

    def save(step: int, periodic: bool = False) -> None:
        failed: CheckpointError | None = None
        if rank == 0:
            periodic_path = (runs.step_checkpoint(run_dir, step),) if periodic else ()
            state = _state_meta(config, step, method, optimizer)
            try:
                checkpoint.save(state, runs.last_checkpoint(run_dir), *periodic_path)
            except CheckpointError as err:  # e.g. a full disk
                failed = err
        # every rank stops with rank 0's error, instead of waiting for it at the next collective
        if dist.any_rank(failed is not None, device):
            raise failed or CheckpointError(
                f"rank 0 could not write the checkpoint of step {step} (see its error)"
            )

    return save


def _state_meta(config: dict, step: int, method=None, optimizer=None) -> dict:
    """What a checkpoint holds besides (or with) the weights and the optimizer state."""
    state = {"model": method.state_dict(), "optimizer": optimizer.state_dict()} if method else {}
    return {
        **state,
        "step": step,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        "config": config,
        "git_sha": checkpoint.git_sha(),
    }


class _ShardedSave:
    """``train.strategy=fsdp``: every rank writes its shards into ``checkpoints/last.dcp/``
    (and ``step_N.dcp/``); periodic saves are asynchronous."""

    def __init__(self, config, method, optimizer, run_dir: Path, rank: int) -> None:
        self.config, self.run_dir = config, run_dir
        self.saver = fsdp.ShardedSaver(method, optimizer, rank)

    def __call__(self, step: int, periodic: bool = False) -> None:
        paths = [runs.last_sharded(self.run_dir)]
        if periodic:
            paths.append(runs.step_sharded(self.run_dir, step))
        self.saver.save(_state_meta(self.config, step), paths, asynchronous=periodic)


class _StopFlag:
    """SIGTERM / SIGINT / SIGHUP set a flag; the loop saves a checkpoint after the step."""

    def __init__(self) -> None:
        self.signal: str | None = None
        stops = [signal.SIGTERM, signal.SIGINT]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup keeps ignoring it
            stops.append(signal.SIGHUP)  # a closed terminal or SSH session
        self.previous = {s: signal.signal(s, self._handle) for s in stops}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
