"""SIGINT, SIGTERM and SIGHUP alike in every command: one line and 128 + the signal's number.

Where there is training state (``mimar pretrain``, ``eval finetune/segment/detect``, the
trained probes) the engine's own handler takes over for the length of the loop: it finishes
the step, saves a checkpoint and returns ``stopped_by`` (exit 130 / 143 / 129; ``--resume``
continues). Everywhere else (kNN, feature extraction, export, sharding) there is nothing to
save, so :func:`signals_stop_the_command` turns each of the three signals into
:class:`Interrupted`, which unwinds like ``KeyboardInterrupt`` (atomic writes remove their
temp files; nothing half-written is left) and the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal outside a training loop (a BaseException, as KeyboardInterrupt: no
    ``except Exception`` swallows it)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name))


def _raise(signum, frame) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def signals_stop_the_command() -> Iterator[None]:
    """Raise :class:`Interrupted` on SIGINT / SIGTERM / SIGHUP inside the block (main thread
    only; a signal the parent process ignores, as under ``nohup``, stays ignored)."""
    previous = {}
    try:
        for s in SIGNALS:
            if signal.getsignal(s) is not signal.SIG_IGN:
                previous[s] = signal.signal(s, _raise)
    except ValueError:  # not the main thread: leave the handlers alone
        pass
    try:
        yield
    except KeyboardInterrupt:  # raised before the handler was in place, or by a library
        raise Interrupted("SIGINT") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
