"""The run-folder layout, spelled once::

RUN_DIR/config.yaml  metrics.jsonl  reconstruction.png
        checkpoints/last.pt  checkpoints/step_0000500.pt ...
        checkpoints/last.dcp/  checkpoints/step_0000500.dcp/ ...   (train.strategy: fsdp)
        eval/<protocol>.json
        pictures/step_0000100.png ...   (train.picture_every)
        tensorboard/events.out.tfevents.*  wandb/   (train.loggers)
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PICTURE = "reconstruction.png"
PICTURES = "pictures"  # step_XXXXXXX.png, every train.picture_every steps
TENSORBOARD = "tensorboard"  # event files (train.loggers: tensorboard)
CHECKPOINTS = "checkpoints"
EVAL = "eval"


def last_checkpoint(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/last.pt``: the newest state of a run, always kept."""
    return Path(run_dir) / CHECKPOINTS / "last.pt"


def step_checkpoint(run_dir: str | Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step_XXXXXXX.pt``: a periodic checkpoint."""
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}.pt"


def last_sharded(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/last.dcp/``: the newest state of an FSDP run (a DCP folder)."""
    return Path(run_dir) / CHECKPOINTS / "last.dcp"


def step_sharded(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:07d}.dcp"


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's newest state: ``last.pt`` or ``last.dcp/``, whichever was written last (a
    run may change strategy on resume), or None when it has neither."""
    found = [p for p in (last_checkpoint(run_dir), last_sharded(run_dir)) if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def run_dir_of(source: str | Path) -> Path:
    """The run folder that ``source`` belongs to: the one rule every command uses.

    ``RUN/checkpoints/<name>.pt`` and ``RUN/checkpoints/<name>.dcp/`` (a folder) -> ``RUN``; any
    other folder is a run folder itself; any other file (an export, a checkpoint copied
    elsewhere) -> the folder it sits in. The checkpoint test comes first, so a DCP folder is
    never taken for a run folder.
    """
    path = Path(source)
    if path.parent.name == CHECKPOINTS and path.suffix in (".pt", ".dcp"):
        return path.parent.parent
    return path if path.is_dir() else path.parent


def run_of_checkpoint(ckpt: str | Path) -> Path:
    """The run folder a checkpoint file (or DCP folder) belongs to (its folder's parent for
    ``checkpoints/*.pt`` and ``checkpoints/*.dcp``, else the folder it sits in)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent
