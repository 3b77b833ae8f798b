"""Run logging: metrics.jsonl (always, rank 0), TensorBoard / W&B when ``train.loggers``
names them, a rich progress bar or plain lines."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mimar import runs, writes
from mimar.errors import ConfigError

log = logging.getLogger("mimar")

CONFIG_CHANGES = "config_changes.jsonl"  # RUN/: changes a resume was forced to accept


@dataclass(frozen=True)
class Run:
    """The run folder a training writes, and how: ``config`` (a plain dict) goes to
    ``config.yaml`` and into every checkpoint; ``resume`` continues its last checkpoint;
    ``changes`` (a forced resume's ``{"key", "old", "new"}`` rows) are appended, with the
    step, to ``config_changes.jsonl``; ``name`` labels the progress bar."""

    dir: Path
    config: dict
    resume: bool = False
    changes: Sequence[dict] = ()
    name: str = "pretrain"


def open_run(run: Run, loggers: Sequence[str], start: int) -> RunLog:
    """Rank 0: write the run folder's ``config.yaml`` (and the config changes of a forced
    resume, from ``start`` on) and open its metrics and loggers."""
    writes.make_dir(run.dir, "run folder")
    writes.write_text(run.dir / runs.CONFIG, yaml.safe_dump(run.config, sort_keys=False))
    for c in run.changes:  # a forced resume: what changed, and from which step on
        writes.append_line(run.dir / CONFIG_CHANGES, json.dumps({"step": start, **c}))
    return RunLog(run.dir, loggers, run.config, start if run.resume else 0)


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``, stamped with ``time``
    (Unix seconds when it was written: where a run spent its wall time, restarts included).

    On resume, rows logged after the checkpoint's step (by a run that died between a log and
    its next checkpoint) are dropped, so the file never holds a step twice; so is a line that
    is not JSON (torn by a kill mid-write), with a warning.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            rows = [(line, _row(path, n, line)) for n, line in enumerate(_lines(path), 1)]
            kept = [
                line for line, row in rows if row is not None and row.get("step", 0) <= resume_step
            ]
            writes.write_text(path, "".join(line + "\n" for line in kept), "metrics")
        self.file = writes.AppendFile(path, "metrics")

    def write(self, row: dict) -> None:
        self.file.write_line(json.dumps({**row, "time": round(time.time(), 3)}))

    def close(self) -> None:
        self.file.close()


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]


def _row(path: Path, number: int, line: str) -> dict | None:
    """The JSON object of one metrics line, or None (warned) for a torn or foreign line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        row = None
    if not isinstance(row, dict):
        log.warning("%s line %d is not a JSON row (a write cut short?): dropped", path, number)
        return None
    return row


class RunLog:
    """metrics.jsonl plus the sinks that ``loggers`` names: every row goes to all of them.

    Rows are logged as ``train/<key>`` (the step rows: loss, lr, grad norm, images/s, ...) or
    ``eval/<key>`` (rows of scores written by evaluations), against their ``step``; pictures
    (PNG files) go to the sinks that show images. Each sink's package is imported only when
    named, with a one-line error when it is not installed.
    """

    def __init__(
        self, run_dir: Path, loggers, config: dict, resume_step: int | None = None
    ) -> None:
        self.metrics = MetricsLog(run_dir / runs.METRICS, resume_step)
        self.sinks = []
        for name in loggers:
            if name != "jsonl":
                with writes.optional(f"{name} logging"):  # degrades; a missing package raises
                    self.sinks.append(_SINKS[name](run_dir, config, resume_step or 0))

    def write(self, row: dict) -> None:
        self.metrics.write(row)
        prefix = "train" if "loss" in row else "eval"
        scalars = {  # keys with their own group (monitor/*, perf/*) keep it
            key if "/" in key else f"{prefix}/{key}": float(value)
            for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for sink in self.sinks:
            with writes.optional("logging to a sink"):
                sink.scalars(scalars, row["step"])

    def picture(self, path: Path, step: int) -> None:
        for sink in self.sinks:
            with writes.optional("logging a picture"):
                sink.picture(path, step)

    def close(self) -> None:
        self.metrics.close()
        for sink in self.sinks:
            with writes.optional("closing a sink"):
                sink.close()


def _require(package: str, logger: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"train.loggers names {logger} but {package} is not installed: "
            f"pip install 'mimar[{logger}]'"
        )


def _png(path: Path):
    """A PNG as an (H, W, 3) uint8 array."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardSink:
    """Scalars and pictures as TensorBoard events in RUN/tensorboard/. On resume, events past
    the checkpoint's step (from the run that died) are purged."""

    def __init__(self, run_dir: Path, config: dict, start: int) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / runs.TENSORBOARD), purge_step=start or None)

    def scalars(self, scalars: dict, step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def picture(self, path: Path, step: int) -> None:
        self.writer.add_image("picture", _png(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars and pictures to Weights & Biases: offline (files in RUN/wandb/, ``wandb sync``
    uploads them) unless the user configured W&B (``WANDB_MODE`` or ``WANDB_API_KEY`` set).
    The W&B run id follows the run folder, so a resumed run continues the same W&B run."""

    def __init__(self, run_dir: Path, config: dict, start: int) -> None:
        _require("wandb", "wandb")
        import wandb

        configured = "WANDB_MODE" in os.environ or "WANDB_API_KEY" in os.environ
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "mimar"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            mode=None if configured else "offline",
        )

    def scalars(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def picture(self, path: Path, step: int) -> None:
        self.run.log({"picture": self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


_SINKS = {"tensorboard": TensorBoardSink, "wandb": WandbSink}


class ProgressBar:
    """Step, loss, lr, images/s and ETA; plain log lines when stdout is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool, name: str = "pretrain") -> None:
        self.console = Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self.total, self.last_print = total, time.monotonic()
        self.enabled = enabled
        self.progress = None
        if self.interactive:
            self.progress = Progress(
                TextColumn(f"[bold]{name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.task = self.progress.add_task(name, total=total, completed=start, stats="")
            self.progress.start()

    def update(self, row: dict) -> None:
        stats = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s"
        if "perf/mfu" in row:  # the monitor's efficiency figures (mimar/monitor/)
            stats += f"  MFU {row['perf/mfu']:.1%}"
        if "data_wait_s" in row and row.get("step_s"):
            stats += f"  data wait {row['data_wait_s'] / row['step_s']:.0%}"
        if self.progress is not None:
            self.progress.update(self.task, completed=row["step"], stats=stats)
        elif self.enabled and (
            time.monotonic() - self.last_print > 10 or row["step"] in (1, self.total)
        ):
            self.last_print = time.monotonic()
            print(f"step {row['step']}/{self.total}  {stats}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def describe_run(method, optimizer, loader, peak_lr: float, world: int) -> None:
    """Log the data, the model size and every optimizer group with its lr scale, once."""
    trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
    log.info("data: %s", loader.images.source)
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
