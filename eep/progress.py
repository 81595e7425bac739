"""Progress of long steps that works in a log as well as on a terminal: done/total, rate and time
left, as a tqdm bar on a terminal and as a plain line every ``every`` seconds otherwise (and one
at the end of a step that took that long; quicker steps say nothing)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator


class Progress:
    def __init__(
        self, description: str, total: int, log: Callable[[str], None], every: float = 10.0
    ):
        self.description, self.total, self.log, self.every = description, total, log, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, leave=False)

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        # quick steps stay quiet
        finished_long = self.done >= self.total and now - self.start >= self.every
        if now - self.last >= self.every or finished_long:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else 0.0
            self.log(
                f"[eep] {self.description}: {self.done}/{self.total}, {rate:.2f}/s, ~{left:.0f}s left"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tracked(
    items: Iterable, description: str, log: Callable[[str], None], every: float = 10.0
) -> Iterator:
    """Yield ``items``, reporting each as done once the caller has dealt with it."""
    items = list(items)
    progress = Progress(description, len(items), log, every)
    try:
        for item in items:
            yield item
            progress.step()
    finally:
        progress.close()


def stderr_log(message: str) -> None:
    """The default ``log``: a line on stderr, flushed (progress lines interleave with tracebacks)."""
    print(message, file=sys.stderr, flush=True)
