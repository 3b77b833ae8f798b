"""Atomic file writes (temp file + rename), checkpoints, and safe loading (``weights_only``).

A checkpoint carries ``content_hash``: sha256 over every tensor's bytes (and every other value)
in a fixed order, checked on load, so a flipped byte in the tensor data (which torch's zip
reader does not notice) is refused instead of trained on. Checkpoints from before the hash
load with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mimar import runs, writes
from mimar.engine import dist
from mimar.errors import CheckpointError, MissingFileError, WriteError

log = logging.getLogger("mimar")

HASH_KEY = "content_hash"
KEYS = ("model", "step", "config")  # what every reader of a mimar checkpoint needs
RESUME_KEYS = (*KEYS, "optimizer", "rng")  # and what resuming needs besides


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``
    (:func:`mimar.writes.atomic_write`: a failure is one WriteError line)."""
    writes.atomic_write(path, write)


def save_atomic(state: dict, path: str | Path) -> None:
    """Write ``state`` so that ``path`` is either the old file or the complete new one."""
    writes.torch_save(state, path, "checkpoint")


def save(state: dict, *paths: str | Path) -> None:
    """Write ``state`` with its content hash to each of ``paths`` (atomically: a failed write,
    e.g. a full disk, leaves the file there was, and raises a one-line WriteError)."""
    stamped = {**state, HASH_KEY: content_hash(state)}
    for path in paths:
        try:
            save_atomic(stamped, path)
        except WriteError as err:
            kept = "the previous checkpoint is intact" if Path(path).exists() else "not saved"
            raise WriteError(f"{err}; {kept}", errno_=err.errno) from None


def load(
    path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = KEYS
) -> dict:
    """A checkpoint's state, its content hash verified, with the keys ``require`` names.

    Anything else is one CheckpointError line: a file torch cannot read, a pickle holding more
    than tensors and plain data (refused, never unpickled), a torch file without our keys, or
    bytes that changed since the save.
    """
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():  # an FSDP run's DCP folder
        from mimar.engine import fsdp

        state = fsdp.read_full(path)
        missing = [key for key in require if state.get(key) is None]
        if missing:
            raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a mimar checkpoint")
        return state
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning: refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower():  # objects beyond tensors and plain data
            raise CheckpointError(
                f"{path} is not a mimar checkpoint: it pickles arbitrary objects (unsafe pickle "
                "refused)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt (cannot unpickle it)") from None
    except Exception as err:  # truncated files, broken zip archives, other formats
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated, corrupt or not a torch file: "
            f"{_first_sentence(err)})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is a torch file but not a mimar checkpoint: it holds a "
            f"{type(state).__name__}, not a dict with keys {', '.join(require)}"
        )
    missing = [key for key in require if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is a torch file but not a mimar checkpoint: missing keys "
            f"{', '.join(missing)} (it has: {', '.join(map(str, list(state)[:8])) or 'none'})"
        )
    stored = state.pop(HASH_KEY, None)
    if stored is None:
        log.warning(
            "checkpoint %s has no content hash (an older mimar wrote it): not verified", path
        )
    elif stored != content_hash(state):
        raise CheckpointError(f"checkpoint {path} is corrupt (content hash mismatch)")
    return state


def restore(
    run_dir: Path, model: torch.nn.Module, optimizer, *, resume: bool, sharded: bool, device
) -> int:
    """Tidy ``run_dir``'s checkpoints after a killed save (rank 0) and, when ``resume``, load
    the run's last checkpoint (``last.pt``, or ``last.dcp/`` when ``sharded``) into ``model``
    and ``optimizer`` with the global RNG state. Every rank calls it; returns the step the run
    continues from (0 for a new run)."""
    if dist.is_main():  # temp files of a save that was killed halfway
        from mimar.engine import fsdp

        fsdp.restore_interrupted(run_dir / runs.CHECKPOINTS)
        remove_orphans(run_dir / runs.CHECKPOINTS)
    dist.barrier()  # no rank looks for the checkpoint while rank 0 tidies
    if not resume:
        return 0
    state = _load_sharded(run_dir, model, optimizer) if sharded else None
    if state is None:
        last = runs.last_checkpoint(run_dir)
        try:
            state = load(last, require=RESUME_KEYS)
        except CheckpointError:
            if (run_dir / "import.json").is_file():  # written by ``mimar import``
                raise CheckpointError(
                    f"{run_dir} is an imported release (import.json): a starting point, not a "
                    f"run to resume; continue it with train.init={run_dir} and a new --run-dir"
                ) from None
            raise
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
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
    if dist.is_main():
        log.info("resuming %s from step %d", run_dir, state["step"])
    return state["step"]


def _load_sharded(run_dir: Path, model: torch.nn.Module, optimizer) -> dict:
    """A DCP folder, saved by any number of ranks, loaded into this rank's shards; its meta."""
    from mimar.engine import fsdp

    last = runs.last_sharded(run_dir)
    if not fsdp.is_sharded_checkpoint(last):
        raise CheckpointError(
            f"train.strategy=fsdp resumes from {last}, which is missing"
            + (
                " (this run has checkpoints/last.pt: resume it with train.strategy=ddp)"
                if runs.last_checkpoint(run_dir).is_file()
                else ""
            )
        )
    return fsdp.load_into(last, model, optimizer)


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an error's first line (torch's read errors run to a paragraph)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split(". ")[0][:200]


def content_hash(state: Any) -> str:
    """sha256 (hex) of ``state``: every tensor's dtype, shape and bytes and every other value's
    repr, under its key path, keys in sorted order."""
    digest = hashlib.sha256()
    _feed(digest, "", state)
    return digest.hexdigest()


def _feed(digest, key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"{key}:dict{len(value)}\n".encode())
        for k, v in sorted(value.items(), key=lambda item: repr(item[0])):
            _feed(digest, f"{key}/{k!r}", v)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{key}:{type(value).__name__}{len(value)}\n".encode())
        for i, v in enumerate(value):
            _feed(digest, f"{key}[{i}]", v)
    else:
        digest.update(f"{key}={value!r}\n".encode())


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the ``*.tmp`` files (and DCP folders) a killed save left in ``folder``; returns
    them."""
    folder = Path(folder)
    orphans = sorted(folder.glob(".*.tmp")) + sorted(folder.glob("[!.]*.tmp"))
    for orphan in orphans:
        if orphan.is_dir():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            orphan.unlink(missing_ok=True)
    if orphans:
        log.warning("removed %d unfinished checkpoint file(s) in %s", len(orphans), folder)
    return orphans


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
