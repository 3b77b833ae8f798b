"""The one runner of every downstream run that trains (``mimar eval finetune | segment |
detect``): build the model and the step loader inside the session, turn the epoch schedule
into the engine's sections, train on ``mimar.engine.loop.fit`` with a test every
``schedule.eval_every_epochs``, then let the task finish (a picture). What differs per task
(data, model, loader, test, picture) is a ``DownstreamTask``; the run folder, exact resume,
signals, NaN stop, bf16 and DDP come from the engine as in pretraining.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from mimar import runs
from mimar.downstream.config import engine_sections
from mimar.engine.loop import Hook, Run, RunResult, Session, fit
from mimar.errors import MissingFileError


class DownstreamTask(Protocol):
    """What a downstream task gives the runner. ``cfg`` is its recipe section
    (``schedule`` / ``train`` / ``optim`` + its own keys); ``name`` names it in the logs."""

    cfg: Any
    name: str

    def build_model(self, session: Session) -> nn.Module: ...

    def build_loader(self, session: Session) -> Any: ...  # steps_per_epoch, epoch_of(step)

    def evaluate(self, model: nn.Module, step: int, session: Session, loader: Any) -> dict: ...

    def finish(self, model: nn.Module, session: Session) -> None: ...


def train_downstream(
    task: DownstreamTask, out: Path, config: dict, *, resume: bool = False
) -> RunResult:
    """Train ``task`` into the run folder ``out`` (``config`` is what its ``config.yaml``
    records); the task finishes (rank 0) unless a signal or a NaN stopped the run."""
    cfg = task.cfg
    with Session(cfg.train) as session:
        torch.manual_seed(cfg.train.seed)  # the model's random initialisation
        model = task.build_model(session)
        loader = task.build_loader(session)
        train, optim = engine_sections(cfg, loader.steps_per_epoch)

        # a test every schedule.eval_every_epochs (0: at the end only) and after the last step
        every = cfg.schedule.eval_every_epochs * loader.steps_per_epoch or train.steps
        test = Hook(every, lambda view: task.evaluate(view.model, view.step, session, loader),
                    at_end=True)  # fmt: skip
        run = Run(out, config, resume=resume, name=task.name)
        result = fit(session, model, loader, train=train, optim=optim, run=run, hooks=[test])
        if session.rank == 0 and result.stopped_by is None:
            task.finish(model, session)
    return result


def refuse_existing(out: Path, what: str) -> None:
    """A downstream run never overwrites one already in ``out`` unless it resumes it."""
    if runs.last_checkpoint(out).exists():
        raise MissingFileError(
            f"{out} already holds a {what}: pass --resume to continue it, or remove it"
        )


def tested_rows(out: Path, key: str) -> list[dict]:
    """The rows of ``out``'s metrics that hold the test score ``key``, in step order."""
    rows = [json.loads(line) for line in (out / runs.METRICS).read_text().splitlines()]
    return [row for row in rows if key in row]
