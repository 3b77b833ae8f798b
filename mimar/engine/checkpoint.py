"""Atomic file writes (temp file + rename), checkpoints, and safe loading (``weights_only``)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from mimar.errors import CheckpointError, MissingFileError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``.

    Readers see either the old file or the complete new one: the temp file lives in the same
    directory (so ``os.replace`` is a rename on one file system), is flushed and fsync-ed
    first, and is removed again if ``write`` raises. Parent directories are created. The file
    gets mode 0644 (``mkstemp`` creates 0600; run outputs are meant to be shared).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(state: dict, path: str | Path) -> None:
    """Write ``state`` so that ``path`` is either the old file or the complete new one."""
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt / truncated / foreign pickles
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


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
