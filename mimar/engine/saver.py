"""The run's checkpoint writers behind one :class:`Saver`: a single file per checkpoint
(``checkpoints/last.pt``, ``step_N.pt``; rank 0 writes it) or, under ``train.strategy=fsdp``,
a DCP folder every rank writes its shards into (``last.dcp/``, ``step_N.dcp/``; periodic saves
asynchronous)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from mimar import runs
from mimar.engine import checkpoint, dist, fsdp
from mimar.errors import CheckpointError


class Saver(Protocol):
    def save(self, step: int, periodic: bool = False) -> None:
        """Write the state after ``step`` as the run's last checkpoint (``periodic``: also as
        ``step_N``). Every rank calls it; a failure raises CheckpointError on every rank."""
        ...

    def wait(self) -> None:
        """Finish a save still in flight (every rank calls it)."""
        ...


def saver_for(
    run_dir: Path, config: dict, model: nn.Module, optimizer, sharded: bool, device: torch.device
) -> Saver:
    """The saver of a run: DCP folders when ``sharded``, else single files."""
    cls = ShardedSave if sharded else FileSave
    return cls(run_dir, config, model, optimizer, device)


def state_meta(config: dict, step: int, model: nn.Module | None = None, optimizer=None) -> dict:
    """What a checkpoint holds besides (or with) the weights and the optimizer state."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()} if model else {}
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


class FileSave:
    """Rank 0 writes ``last.pt`` (and ``step_N.pt``) atomically; the other ranks wait for it."""

    def __init__(self, run_dir: Path, config: dict, model, optimizer, device) -> None:
        self.run_dir, self.config, self.device = run_dir, config, device
        self.model, self.optimizer = model, optimizer

    def save(self, step: int, periodic: bool = False) -> None:
        failed: CheckpointError | None = None
        if dist.rank() == 0:
            extra = (runs.step_checkpoint(self.run_dir, step),) if periodic else ()
            state = state_meta(self.config, step, self.model, self.optimizer)
            try:
                checkpoint.save(state, runs.last_checkpoint(self.run_dir), *extra)
            except CheckpointError as err:  # e.g. a full disk
                failed = err
        # every rank stops with rank 0's error, instead of waiting for it at the next collective
        if dist.any_rank(failed is not None, self.device):
            raise failed or CheckpointError(
                f"rank 0 could not write the checkpoint of step {step} (see its error)"
            )

    def wait(self) -> None:
        return None  # file saves are synchronous


class ShardedSave:
    """Every rank writes its shards into ``last.dcp/`` (and ``step_N.dcp/``); periodic saves
    are asynchronous (:class:`mimar.engine.fsdp.ShardedSaver`)."""

    def __init__(self, run_dir: Path, config: dict, model, optimizer, device) -> None:
        self.run_dir, self.config = run_dir, config
        self.writer = fsdp.ShardedSaver(model, optimizer, dist.rank())

    def save(self, step: int, periodic: bool = False) -> None:
        paths = [runs.last_sharded(self.run_dir)]
        if periodic:
            paths.append(runs.step_sharded(self.run_dir, step))
        self.writer.save(state_meta(self.config, step), paths, asynchronous=periodic)

    def wait(self) -> None:
        self.writer.wait()
