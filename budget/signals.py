"""Stop signals: what a scheduler, a closed terminal or a user sends a training process.

Ctrl-C, SIGTERM (what schedulers send), SIGHUP (a closed SSH session) and SIGUSR1 (Slurm's
``--signal=USR1@90``) ask a run to stop at the end of its step, after a checkpoint; a second
Ctrl-C stops at once. Beside ``adabudget.ddp``, the other process concern of a run:
``adabudget.session.RunSession`` installs the handler around both training loops, and under
``torchrun`` makes every rank agree on what any one of them received.
"""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Context manager: while inside, the stop signals set ``received`` (the signal's name).

    Installed only in the main thread (Python allows handlers nowhere else), restored on exit.
    The handler only sets ``received``: the loop logs. A handler that logs can land inside a
    write to the same stream (a tqdm bar, a log line) and CPython then raises a reentrant-write
    error in the middle of training.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
