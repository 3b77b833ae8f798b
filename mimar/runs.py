"""The run-folder layout, spelled once::

RUN_DIR/config.yaml  metrics.jsonl  reconstruction.png
        checkpoints/last.pt  checkpoints/step_0000500.pt ...
        checkpoints/last.dcp/  checkpoints/step_0000500.dcp/ ...   (train.strategy: fsdp)
        eval/<protocol>.json
        pictures/step_0000100.png ...   (train.picture_every)
        tensorboard/events.out.tfevents.*  wandb/   (train.loggers)
        .lock   (the PID of the process training into the folder; see lock_run)
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mimar.errors import RunLockedError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
PICTURE = "reconstruction.png"
PICTURES = "pictures"  # step_XXXXXXX.png, every train.picture_every steps
TENSORBOARD = "tensorboard"  # event files (train.loggers: tensorboard)
CHECKPOINTS = "checkpoints"
EVAL = "eval"
LOCK = ".lock"

_held: dict[Path, int] = {}  # run folder (resolved) -> the open lock file's descriptor


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


def eval_folder(source: str | Path, out: str | Path | None = None) -> Path:
    """Where an evaluation of ``source`` writes: ``out`` (``mimar eval --out DIR``: a read-only
    run can be evaluated), else ``eval/`` of the run ``source`` belongs to
    (:func:`run_dir_of`). Frozen results and the trained protocols' run folders alike."""
    return Path(out) if out else run_dir_of(source) / EVAL


def run_of_checkpoint(ckpt: str | Path) -> Path:
    """The run folder a checkpoint file (or DCP folder) belongs to (its folder's parent for
    ``checkpoints/*.pt`` and ``checkpoints/*.dcp``, else the folder it sits in)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent


def lock_run(run_dir: str | Path) -> bool:
    """Take ``RUN/.lock`` for this process: one process trains into a run folder at a time.

    The lock is ``fcntl.flock`` on an open file, so the kernel drops it when the process ends
    however it ends (kill -9 included): no stale lock is ever left. The file holds the PID of
    the holder, which a refused second start names. Taking a lock this process already holds
    does nothing. Under torchrun only rank 0 calls this (the ranks share one folder).

    Returns:
        True when this call took the lock, False when this process held it already.

    Raises:
        RunLockedError: another live process holds it (one line naming its PID).
        WriteError: the folder or its lock file cannot be created (read-only, under a file).
    """
    from mimar import writes  # writes imports nothing of runs; kept local for layering clarity

    folder = Path(run_dir).resolve()
    if folder in _held:
        return False
    path = folder / LOCK
    fd = writes.open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"{run_dir} is in use: process {holder} is training into it ({path} is locked); "
            "wait for it to end or stop it, or choose another --run-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[folder] = fd
    return True


def unlock_run(run_dir: str | Path) -> None:
    """Release the lock :func:`lock_run` took (the file stays; an unlocked file is no lock)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def lock_rank() -> bool:
    """Whether this process takes run locks: always, except torchrun's ranks > 0 (``RANK``),
    which train into the folder that rank 0 holds."""
    return os.environ.get("RANK", "0") == "0"


def unlock_all() -> None:
    """Release every lock this process holds (the end of a command run in-process)."""
    for folder in list(_held):
        unlock_run(folder)


@contextmanager
def locked_run(run_dir: str | Path, take: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block (``take=False``: do nothing, e.g. on ranks > 0);
    a lock this process held before the block stays held after it."""
    took = lock_run(run_dir) if take else False
    try:
        yield
    finally:
        if took:
            unlock_run(run_dir)
