"""How the engine reports progress and is stopped: the callbacks a step passes in."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

Checkpoint = Callable[[], None]
Progress = Callable[[int, int], None]  # (bytes done, bytes expected)
DumpWriter = Callable[[Path], None]  # writes one dump to the given file


def no_checkpoint() -> None:
    return None


def no_progress(done: int, expected: int) -> None:
    return None


class Throttle:
    """Calls `progress` at most every 1 % or half second.

    `below_end`: `expected` is a guess (the previous snapshot's size), so the count
    stays below it until `finish` says the work is done.
    """

    def __init__(
        self, progress: Progress, expected: int, now: Callable[[], float] = time.monotonic, *, below_end: bool = False
    ) -> None:
        self.progress = progress
        self.expected = max(1, expected)
        self.now = now
        self.done = 0
        self._last_done = -1
        self._last_at = 0.0
        self._top = self.expected - max(1, self.expected // 100) if below_end else self.expected

    def add(self, count: int, *, force: bool = False) -> None:
        self.done += count
        at = self.now()
        if force or self.done - self._last_done >= self.expected / 100 or at - self._last_at >= 0.5:
            self._last_done, self._last_at = self.done, at
            self.progress(min(self.done, self._top), self.expected)

    def finish(self) -> None:
        """The work is done: report the whole of `expected`."""
        self._top = self.expected
        self.add(max(0, self.expected - self.done), force=True)
