"""Run logging: metrics.jsonl (always, rank 0), a rich progress bar or plain lines."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("mimar")


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl``.

    On resume, rows logged after the checkpoint's step (by a run that died between a log and
    its next checkpoint) are dropped, so the file never holds a step twice.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


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
