"""Output that never decides whether work survives: stdout/stderr that go quiet when closed.

``mimar pretrain ... 2>&1 | head -1`` closes the pipe after one line; a dying ``tee`` does
the same. Python then raises ``BrokenPipeError`` from the next ``print``, log line or progress
bar refresh, wherever it happens to be: a run died at step 1 with no checkpoint, an eval before
writing its JSON. :func:`quiet_when_closed` wraps ``sys.stdout`` and ``sys.stderr`` once, at the
start of a command, so every writer (``print``, ``logging`` handlers, rich consoles, which look
the stream up at each write) goes through one place: the first failed write turns that stream
off (its descriptor is pointed at ``/dev/null``, so the interpreter's last flush succeeds too)
and the work goes on. What was computed still reaches the run folder.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

# EPIPE: the reader went away; EIO: the terminal went away (SSH dropped, SIGHUP ignored)
_GONE = (errno.EPIPE, errno.EIO, errno.ECONNRESET)


class QuietStream:
    """A text stream that forwards to ``stream`` until a write or flush finds it closed, and
    then swallows everything (``closed_early`` says so)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_early = False

    def write(self, text: str) -> int:
        if not self.closed_early:
            try:
                return self._stream.write(text)
            except (OSError, ValueError) as err:
                self._went_away(err)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.closed_early:
            try:
                self._stream.flush()
            except (OSError, ValueError) as err:
                self._went_away(err)

    def isatty(self) -> bool:
        return not self.closed_early and self._stream.isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, buffer, errors, ...
        return getattr(self._stream, name)

    def _went_away(self, err: BaseException) -> None:
        if isinstance(err, OSError) and err.errno not in _GONE:
            raise err
        if isinstance(err, ValueError) and "closed file" not in str(err):
            raise err
        self.closed_early = True
        try:  # the descriptor's later writers (C code, the interpreter's exit flush) too
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass


@contextmanager
def quiet_when_closed() -> Iterator[None]:
    """Run the block with ``sys.stdout`` / ``sys.stderr`` wrapped in :class:`QuietStream`
    (not twice; the original streams are back afterwards)."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, QuietStream):
        sys.stdout = QuietStream(sys.stdout)
    if not isinstance(sys.stderr, QuietStream):
        sys.stderr = QuietStream(sys.stderr)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):  # what is still buffered, while guarded
            stream.flush()
        sys.stdout, sys.stderr = saved
