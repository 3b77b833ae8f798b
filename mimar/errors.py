"""mimar's own error types: what a user can fix (a config key, a file, a checkpoint).

The command line prints these as one line (``mimar <command>: error: ...``) and lets every
other exception through with its traceback: those are bugs, not bad input. Each type also
subclasses the builtin it refines, so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

MAX_QUOTE = 200  # characters of a value an error message quotes
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxstring, _repr.maxother = 3, MAX_QUOTE, MAX_QUOTE
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8


def clip(value: Any) -> str:
    """``repr(value)`` cut to ~``MAX_QUOTE`` characters, in time bounded by the cut (never the
    whole repr of a huge or shared structure): what every error message quotes of a value."""
    text = _repr.repr(value)
    return text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 3] + "..."


class MimarError(Exception):
    """Base of every error caused by input a user can correct."""


class ConfigError(MimarError, ValueError):
    """A recipe, override or option that does not fit the typed configuration."""


def check_range(key: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise a ConfigError naming ``key`` and the ``allowed`` range unless ``ok`` holds (and a
    float ``value`` is finite: comparisons with nan are all false, inf passes bounds).

    The one range check of every config section (``mimar.config`` re-exports it); it lives
    here, in the bottom layer, so that backbone and method configs use it too."""
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key} must be {allowed}, got {clip(value)}")


class DataError(MimarError, ValueError):
    """Images or labels that cannot be read or do not fit the recipe."""


class MissingFileError(MimarError, FileNotFoundError):
    """A file or folder the input names does not exist."""


class CheckpointError(MimarError, ValueError):
    """A checkpoint or exported file that cannot be read or does not fit."""


class Stopped(Exception):
    """A signal (SIGTERM / SIGINT) stopped a training protocol after its checkpoint was saved;
    the command exits with 128 + the signal's number, as a killed process does."""

    def __init__(self, signal_name: str, what: str) -> None:
        super().__init__(f"{what} stopped by {signal_name}; checkpoint saved")
        self.signal_name = signal_name


class RunLockedError(MimarError, BlockingIOError):
    """Another live process holds the run folder's lock (``RUN/.lock``)."""


class WriteError(MimarError, OSError):
    """A file mimar writes could not be written (full disk, read-only, a file in the way):
    one line naming the path, the reason and what to do (``mimar.writes``)."""

    exit_code = 74  # sysexits EX_IOERR: the machine failed, not the input

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    def __str__(self) -> str:
        return self.args[0]
