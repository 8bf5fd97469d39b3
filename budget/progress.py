"""The training loop's progress: a tqdm bar on a terminal, plain lines in a log.

A bar redraws itself with carriage returns, which a Slurm or nohup log (or a pipe) keeps as one
ever-growing line. Off a terminal the loop prints a line at each logging step instead (every
``train.log_every`` steps and the last), the same cadence as ``metrics.jsonl``::

    adalora-mr step 40/200 | loss 0.6813 | 12.3 it/s | ETA 0:00:13
"""

from __future__ import annotations

import datetime
import sys
import time


def interactive(stream) -> bool:
    """Whether a bar on ``stream`` redraws in place: a terminal, or a notebook (tqdm.auto's widget)."""
    from tqdm.autonotebook import tqdm as auto  # the widget in a notebook kernel, else tqdm.std's
    from tqdm.std import tqdm as plain

    isatty = getattr(stream, "isatty", None)
    return auto is not plain or bool(isatty and isatty())


class StepProgress:
    """Progress over ``total`` optimizer steps from ``initial`` (a resumed run): ``update`` after
    each step, ``report(loss)`` at each logging step. On a terminal a tqdm bar (the loss in its
    postfix); elsewhere ``report`` prints ``<desc> step s/T | loss | it/s | ETA`` to ``file``.
    Disabled: nothing at all (search trials, ranks other than the main one)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True, file=None):
        self.total, self.step, self.desc = total, initial, desc
        self.file = file if file is not None else sys.stderr
        self.enabled = enabled
        # the rate counts this process's steps only: a resumed run's earlier steps took no time here
        self.first, self.start = initial, time.monotonic()
        self.bar = None
        if enabled and interactive(self.file):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, file=self.file)

    def update(self, n: int = 1) -> None:
        self.step += n
        if self.bar is not None:
            self.bar.update(n)

    def report(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.enabled:
            print(self.line(loss), file=self.file, flush=True)

    def line(self, loss: float) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.step - self.first) / elapsed if elapsed > 0 else 0.0
        left = self.total - self.step
        eta = str(datetime.timedelta(seconds=round(left / rate))) if rate > 0 else "?"
        return f"{self.desc} step {self.step}/{self.total} | loss {loss:.4f} | {rate:.3g} it/s | ETA {eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
