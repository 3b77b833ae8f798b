"""Periodic work during training (evaluation, pictures, the online monitor, efficiency
accounting), handed to the engine as hooks: the engine calls them and knows none of them.

Rules the engine keeps for every hook:
- a hook runs on rank 0 only; under FSDP every rank first helps gather the whole model;
- a hook never draws from the training RNG streams (the engine forks the RNG around it), so
  exact resume and ``1 process == N processes`` hold with any hooks on;
- what ``fn`` returns is logged at that step: numbers go into ``metrics.jsonl`` and the
  loggers, a ``Path`` (returned alone or as a value of the dict) is a picture sent to the
  loggers (``train.loggers``). A row hook's (``every=0``) numbers join the step's row
  (``train/<key>`` in the loggers); the others' form a row of their own, ``{"step", "epoch",
  ...}``, written after it (``eval/<key>``).

The loop (``mimar.engine.loop.fit``) takes them as ``hooks=[Hook(every, fn), ...]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn


@dataclass
class StepView:
    """What a hook sees after a step.

    ``step``: optimizer steps done (1-based); ``total``: ``train.steps``; ``model``: the whole
    trained module (rank 0; under FSDP an unsharded copy, or this rank's shards when no due
    hook ``needs_model``), in training mode: a hook that switches it to eval mode switches it
    back; ``row``: the scalars logged for this step
    (``loss``, ``lr``, ``images_per_s``, ``step_s``, ``data_wait_s``, ...), read-only;
    ``run_dir``: the run folder.
    """

    step: int
    total: int
    model: nn.Module
    row: dict = field(default_factory=dict)
    run_dir: Path | None = None


@dataclass(frozen=True)
class Hook:
    """``fn`` after every ``every``-th step (and after the last one when ``at_end``).

    ``every=0`` runs ``fn`` with every logged row instead (each ``train.log_every`` steps and
    the last), without forcing a read of the device in between: for cheap per-row work such
    as efficiency figures. ``needs_model=False`` skips the FSDP gather for hooks that only read
    ``row``.
    """

    every: int
    fn: Callable[[StepView], dict | None]
    at_end: bool = False
    needs_model: bool = True
    name: str = ""

    def due(self, step: int, total: int) -> bool:
        """Whether this hook forces work (and a read of the device) after ``step``."""
        return (self.every > 0 and step % self.every == 0) or (self.at_end and step == total)
