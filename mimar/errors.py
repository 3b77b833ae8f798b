"""mimar's own error types: what a user can fix (a config key, a file, a checkpoint).

The command line prints these as one line (``mimar <command>: error: ...``) and lets every
other exception through with its traceback: those are bugs, not bad input. Each type also
subclasses the builtin it refines, so ``except ValueError`` keeps working for library users.
"""

from __future__ import annotations

import math
from typing import Any


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
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


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
