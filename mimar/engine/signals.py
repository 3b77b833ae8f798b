"""SIGTERM / SIGINT / SIGHUP during training: the loop finishes the current step, saves a
checkpoint and stops (the CLI then exits 143 / 130 / 129, as a killed process: the run is not
finished)."""

from __future__ import annotations

import signal


class StopFlag:
    """SIGTERM / SIGINT / SIGHUP set a flag; the loop saves a checkpoint after the step."""

    def __init__(self) -> None:
        self.signal: str | None = None
        stops = [signal.SIGTERM, signal.SIGINT]
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup keeps ignoring it
            stops.append(signal.SIGHUP)  # a closed terminal or SSH session
        self.previous = {s: signal.signal(s, self._handle) for s in stops}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
