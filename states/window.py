"""`window`: wait until an allowed maintenance window is open (only when policy.windows is set).

A run that needs downtime does not start when the last comparable runs say its
downtime would overrun what is left of the window.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.context import StepContext

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Window:
    days: frozenset[int]
    start: dt.time
    end: dt.time

    @classmethod
    def parse(cls, text: str) -> Window:
        match = re.match(r"^(\w{3})(?:-(\w{3}))?\s+(\d\d):(\d\d)-(\d\d):(\d\d)$", text.strip())
        if not match:
            raise ValueError(f"window {text!r} is not like 'Mon-Tue 07:00-12:00'")
        first = DAYS.index(match.group(1))
        last = DAYS.index(match.group(2) or match.group(1))
        days = frozenset(range(first, last + 1)) if first <= last else frozenset([*range(first, 7), *range(last + 1)])
        numbers = [int(match.group(i)) for i in range(3, 7)]
        return cls(days, dt.time(numbers[0], numbers[1]), dt.time(numbers[2], numbers[3]))

    def remaining(self, moment: dt.datetime) -> float | None:
        """Seconds left in this window at `moment`, or None when it is not open."""
        if moment.weekday() not in self.days:
            return None
        start = moment.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        end = moment.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        if not start <= moment < end:
            return None
        return (end - moment).total_seconds()


def open_window(windows: Sequence[Window], moment: dt.datetime) -> float | None:
    """The most time left in any open window at `moment`, or None when none is open."""
    left = [r for r in (w.remaining(moment) for w in windows) if r is not None]
    return max(left) if left else None


def required(config: Config, facts: dict[str, Any]) -> bool:
    return bool(config.policy.windows)


def run(ctx: StepContext) -> None:
    windows = [Window.parse(text) for text in ctx.config.policy.windows]
    expected = float(ctx.facts.get("expected_downtime_seconds") or 0.0) if ctx.facts.get("downtime") else 0.0
    announced = False
    while True:
        left = open_window(windows, dt.datetime.fromtimestamp(ctx.now()))
        if left is not None and left >= expected:
            ctx.event(f"maintenance window open ({left / 60:.0f} min left)")
            return
        if not announced:
            why = (
                "no window is open"
                if left is None
                else (f"the expected downtime ({expected:.0f}s) would overrun the open window ({left:.0f}s left)")
            )
            ctx.event(f"waiting for a window ({', '.join(ctx.config.policy.windows)}): {why}")
            announced = True
        ctx.wait(POLL_SECONDS)
