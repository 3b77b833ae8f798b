"""The one write layer: every file mimar writes goes through these functions.

A write can fail for reasons no code here controls: a full disk (``ENOSPC``, or torch's
``RuntimeError ... unexpected pos`` when ``torch.save`` runs out of space inside its zip
writer), a read-only mount (``EROFS``), a missing permission, a run folder below an existing
file (``ENOTDIR``). Each of these becomes one :class:`~mimar.errors.WriteError` line that names
the path, the reason and what to do; the CLI prints it and exits with :data:`EXIT_CODE`.

Required writes (checkpoints, metrics, eval JSON, exports, config copies) raise. Optional
writes (the feature cache, pictures, TensorBoard events) run inside :func:`optional`, which
turns the failure into one warning and lets the work go on.

Whole files are written atomically (a temp file beside the target, fsync-ed, renamed over it):
a reader sees the old file or the complete new one, never a torn one, and a failed write
leaves the old file as it was.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from mimar.errors import WriteError

log = logging.getLogger("mimar")

EXIT_CODE = 74  # sysexits.h EX_IOERR: the environment failed, not the input (2) or the run (3)

_REASONS = {
    errno.ENOSPC: ("no space left on the device", "free space or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder"),
    errno.EACCES: ("permission denied", "write to a folder you may write to"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write to"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "choose another path"),
    errno.EISDIR: ("the path is a folder", "choose another path"),
    errno.EEXIST: ("a part of the path exists and is not a folder", "choose another path"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.EIO: ("an input/output error of the device", "check the disk"),
}
# What torch's zip writer raises instead of an OSError when the disk fills under torch.save
_TORCH_WRITE_ERRORS = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed write (an OSError, or torch's RuntimeError from its zip
    writer) rather than a bug."""
    if isinstance(err, WriteError):
        return True
    if isinstance(err, OSError):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_ERRORS)


def explain(err: BaseException, path: str | os.PathLike, what: str = "") -> WriteError:
    """The one-line :class:`WriteError` of a failed write of ``path`` (``what``: what was
    being written, e.g. "checkpoint"; ``err``: the OSError or torch error)."""
    if isinstance(err, WriteError):
        return err
    code = getattr(err, "errno", None)
    if code is None and isinstance(err, RuntimeError):
        code = errno.ENOSPC  # torch's zip writer: the write stopped short, a full disk
        reason, todo = "the write stopped short (no space left on the device?)", _REASONS[code][1]
    else:
        reason, todo = _REASONS.get(code, (None, "check the path and the disk"))
        if reason is None:
            reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:200] or "failed"
    noun = f"{what} " if what else ""
    return WriteError(f"cannot write {noun}{path}: {reason}; {todo}", errno_=code)


@contextmanager
def guard(path: str | os.PathLike, what: str = "") -> Iterator[None]:
    """Turn a failed write inside the block into :func:`explain`'s WriteError."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, RuntimeError) as err:
        if not is_write_failure(err):
            raise
        raise explain(err, path, what) from None


def make_dir(path: str | os.PathLike, what: str = "folder") -> Path:
    """``mkdir -p path``, failing as one line."""
    path = Path(path)
    with guard(path, what):
        path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(
    path: str | os.PathLike, write: Callable[[BinaryIO], object], what: str = ""
) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``
    (:func:`atomic_file`)."""
    with atomic_file(path, what) as f:
        write(f)


@contextmanager
def atomic_file(path: str | os.PathLike, what: str = "") -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temp file beside it, renamed over ``path``
    when the block ends without an error (a stream written piece by piece: a shard's tar).

    Readers see either the old file or the complete new one: the temp file lives in the same
    folder (so ``os.replace`` is a rename on one file system), is flushed and fsync-ed first,
    and is removed again if anything fails. Parent folders are created. The file gets mode
    0644 (``mkstemp`` creates 0600; run outputs are meant to be shared).
    """
    path = Path(path)
    make_dir(path.parent, f"the folder of {what or 'the file'}")
    with guard(path, what):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def rename(src: str | os.PathLike, dst: str | os.PathLike, what: str = "") -> None:
    """``os.replace(src, dst)`` (a file or a folder put into place), failing as one line."""
    with guard(dst, what):
        os.replace(src, dst)


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "") -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data), what)


def write_text(path: str | os.PathLike, text: str, what: str = "") -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode(), what)


def torch_save(obj: Any, path: str | os.PathLike, what: str = "") -> None:
    """``torch.save(obj)`` to ``path`` atomically; torch's own full-disk error included."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), what)


def save_with(path: str | os.PathLike, save: Callable[[str], object], what: str = "") -> None:
    """Atomically write ``path`` with a library function that takes a file name
    (``safetensors.save_file``, ``fig.savefig``): it writes a temp name, renamed when done."""
    path = Path(path)
    make_dir(path.parent, f"the folder of {what or 'the file'}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    with guard(path, what):
        try:
            save(str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class AppendFile:
    """A file written one line at a time (``metrics.jsonl``), each line flushed; a failed
    write is one WriteError line."""

    def __init__(self, path: str | os.PathLike, what: str = "") -> None:
        self.path, self.what = Path(path), what
        make_dir(self.path.parent, f"the folder of {what or 'the file'}")
        with guard(self.path, what):
            self.file = self.path.open("a")

    def write_line(self, line: str) -> None:
        with guard(self.path, self.what):
            self.file.write(line + "\n")
            self.file.flush()

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the data already failed loudly at its flush; closing may not
            pass


def append_line(path: str | os.PathLike, line: str, what: str = "") -> None:
    """Append one line to ``path`` (created when missing)."""
    appender = AppendFile(path, what)
    try:
        appender.write_line(line)
    finally:
        appender.close()


def open_lock_file(path: str | os.PathLike) -> int:
    """A descriptor of ``path`` opened read-write (created 0644), for ``fcntl.flock``."""
    path = Path(path)
    make_dir(path.parent, "run folder")
    with guard(path, "lock file"):
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextmanager
def optional(what: str) -> Iterator[None]:
    """Run an optional write: a failure is one warning and the work goes on."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_write_failure(err):
            raise
        error = explain(err, getattr(err, "filename", None) or "?", what)
        log.warning("%s (skipped: %s is optional)", error, what)
