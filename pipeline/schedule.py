"""Time as the site reads it: the nightly check's cron schedule and the maintenance windows, in an IANA zone.

Both are written in local wall-clock time (`auto_update.timezone`,
`policy.timezone`; by default the machine's) and turned into instants here,
with one rule for the two nights a year when wall-clock time is not a clock:

- a wall time the clock jumps over (spring forward, 02:30 in Europe/Paris) is
  the instant of the jump (03:00 local): a check scheduled then runs when the
  clock jumps; a window `02:00-03:00` opens and closes at the same instant,
  so it does not open that night;
- a wall time that happens twice (autumn, 02:00-03:00 in Europe/Paris) is its
  first occurrence: a check scheduled at 02:30 runs once, and a window
  `02:00-03:00` stays open through both passes (two real hours).

Every function takes the instant it reasons about (`now`, `after`) as a
parameter: nothing here reads the clock.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAY = "(Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_TIME = r"([0-9]{2}):([0-9]{2})"
_DAYS_FORM = re.compile(rf"{_DAY}(?:-{_DAY})?\s+{_TIME}-{_TIME}", re.ASCII)
_SPAN_FORM = re.compile(rf"{_DAY}\s+{_TIME}-{_DAY}\s+{_TIME}", re.ASCII)
_WINDOW_EXAMPLE = "is not like 'Mon-Tue 07:00-12:00' or 'Sat 22:00-Sun 04:00'"
DAY_MINUTES = 24 * 60
MAX_SLOT_SEARCH = 2000  # cron matches looked at before a schedule is declared never to fire


# -- zones ---------------------------------------------------------------------------


def machine_zone() -> dt.tzinfo:
    """The machine's zone: $TZ if it names one, else /etc/localtime, else UTC."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as handle:
            target = os.path.realpath("/etc/localtime")
            key = target.split("/zoneinfo/", 1)[1] if "/zoneinfo/" in target else "localtime"
            return ZoneInfo.from_file(handle, key=key)
    except (OSError, ValueError):
        return dt.UTC


def zone(name: str | None) -> dt.tzinfo:
    """The IANA zone `name`, or the machine's when None."""
    return machine_zone() if name is None else ZoneInfo(name)


def check_zone_name(name: str) -> str:
    """`name` if it is an IANA zone this machine knows; ValueError otherwise (for the configuration)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone name such as Europe/Paris or UTC") from None
    return name


def zone_name(tz: dt.tzinfo) -> str:
    return str(getattr(tz, "key", None) or tz)


def local_text(ts: float, tz: dt.tzinfo) -> str:
    """`2026-11-30 00:00:00 CET`."""
    return dt.datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def _wall(ts: float, tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, tz).replace(tzinfo=None)


def instant(wall: dt.datetime, tz: dt.tzinfo) -> float:
    """The instant of the naive local time `wall` in `tz` (see the module's rule for DST nights)."""
    first = wall.replace(tzinfo=tz, fold=0).timestamp()
    if _wall(first, tz) == wall:
        return first  # it exists; fold 0 is the first of a repeated time
    # The clock jumped over `wall`: the first instant whose local time is later is the jump itself.
    low, high = sorted((int(wall.replace(tzinfo=tz, fold=1).timestamp()), int(first)))
    while high - low > 1:
        middle = (low + high) // 2
        if _wall(middle, tz) > wall:
            high = middle
        else:
            low = middle
    return float(high)


# -- the nightly check ------------------------------------------------------------------


def check_cron(expression: str) -> str:
    """A five-field cron expression (minute hour day month weekday); ValueError otherwise."""
    from croniter import croniter

    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise ValueError(f"{expression!r} is not a cron schedule of five fields such as '0 0 * * *'")
    try:
        croniter(expression, dt.datetime(2000, 1, 1)).get_next(dt.datetime)
    except ValueError:
        raise ValueError(f"the schedule {expression!r} never names a time (such as February 30)") from None
    return expression


def next_slot(expression: str, tz: dt.tzinfo, after: float) -> float:
    """The first instant strictly after `after` that the cron `expression` names in `tz`.

    The expression is matched against wall-clock times; each match becomes an
    instant by the module's rule, and matches at or before `after` (the first
    pass of a repeated hour already had them) are passed over.
    """
    from croniter import croniter

    matches = croniter(expression, _wall(after, tz))
    for _ in range(MAX_SLOT_SEARCH):
        try:
            wall = matches.get_next(dt.datetime)
        except ValueError:
            break
        moment = instant(wall, tz)
        if moment > after:
            return moment
    raise ValueError(f"the schedule {expression!r} names no time after {local_text(after, tz)}")


def machine_seed() -> str:
    """What makes one site's jitter differ from another's: /etc/machine-id, else the host name."""
    try:
        text = Path("/etc/machine-id").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or socket.gethostname()


def jitter_offset(slot: float, jitter: float, seed: str) -> float:
    """A delay in [0, jitter) after `slot`, the same for a site and slot every time it is computed."""
    if jitter <= 0:
        return 0.0
    import hashlib  # here, not at the top: `status` imports this module and starts without hashlib

    digest = hashlib.sha256(f"{seed}|{int(slot)}".encode()).digest()
    return jitter * int.from_bytes(digest[:8], "big") / 2**64


def next_check(expression: str, tz: dt.tzinfo, after: float, *, jitter: float = 0.0, seed: str = "") -> float:
    """When the check of the first slot after `after` is due: the slot plus this site's jitter."""
    slot = next_slot(expression, tz, after)
    return slot + jitter_offset(slot, jitter, seed)


# -- maintenance windows ---------------------------------------------------------------------


@dataclass(frozen=True)
class Opening:
    """One weekly opening: from `start` minutes after midnight of `weekday`, to `end` minutes after
    midnight `days` days later (end may be 1440: midnight of the day after)."""

    weekday: int
    start: int
    days: int
    end: int


@dataclass(frozen=True)
class Window:
    text: str
    openings: tuple[Opening, ...]


def _minutes(hours: str, minutes: str, text: str, *, end: bool) -> int:
    value = int(hours) * 60 + int(minutes)
    if int(minutes) > 59 or value > DAY_MINUTES or (value == DAY_MINUTES and not end):
        raise ValueError(f"window {text!r}: {hours}:{minutes} is not a time of day (00:00 to 24:00)")
    return value


def parse_window(text: str) -> Window:
    """`Mon-Tue 07:00-12:00` (each day; an end before the start crosses midnight) or
    `Sat 22:00-Sun 04:00` (one span from a day and time to another)."""
    clean = text.strip()
    match = _DAYS_FORM.fullmatch(clean)
    if match:
        first = DAYS.index(match.group(1))
        last = DAYS.index(match.group(2) or match.group(1))
        start = _minutes(match.group(3), match.group(4), text, end=False)
        end = _minutes(match.group(5), match.group(6), text, end=True)
        if start == end:
            raise ValueError(f"window {text!r} opens and closes at the same time")
        days = 0 if end > start else 1
        count = (last - first) % 7 + 1
        openings = tuple(Opening((first + i) % 7, start, days, end) for i in range(count))
        return Window(clean, openings)
    match = _SPAN_FORM.fullmatch(clean)
    if match:
        first, last = DAYS.index(match.group(1)), DAYS.index(match.group(4))
        start = _minutes(match.group(2), match.group(3), text, end=False)
        end = _minutes(match.group(5), match.group(6), text, end=True)
        days = (last - first) % 7
        if days == 0 and end <= start:
            raise ValueError(f"window {text!r} ends before it opens (a window spans less than a week)")
        return Window(clean, (Opening(first, start, days, end),))
    raise ValueError(f"window {text!r} {_WINDOW_EXAMPLE}")


def _wall_of(day: dt.date, minutes: int) -> dt.datetime:
    return dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=minutes)


def spans(windows: Sequence[Window], tz: dt.tzinfo, now: float) -> list[tuple[float, float]]:
    """The windows' openings from a week before `now` to a week after, as merged (start, end) instants.

    An opening the clock jumps over entirely (02:00-03:00 on the spring-forward
    night) has no length and is left out.
    """
    today = _wall(now, tz).date()
    found: list[tuple[float, float]] = []
    for offset in range(-8, 9):
        day = today + dt.timedelta(days=offset)
        for window in windows:
            for opening in window.openings:
                if opening.weekday != day.weekday():
                    continue
                start = instant(_wall_of(day, opening.start), tz)
                end = instant(_wall_of(day + dt.timedelta(days=opening.days), opening.end), tz)
                if end > start:
                    found.append((start, end))
    merged: list[tuple[float, float]] = []
    for start, end in sorted(found):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def time_left(windows: Sequence[Window], tz: dt.tzinfo, now: float) -> float | None:
    """Seconds until the open window closes, or None when none is open at `now`."""
    for start, end in spans(windows, tz, now):
        if start <= now < end:
            return end - now
    return None


def next_opening(windows: Sequence[Window], tz: dt.tzinfo, now: float, *, lasting: float = 0.0) -> float | None:
    """When a window next opens after `now` (with `lasting`: `now` itself if the open one has that long
    left, else the start of the first window at least that long); None if none does within a week."""
    for start, end in spans(windows, tz, now):
        if end <= now:
            continue
        if start <= now:
            if lasting and end - now >= lasting:
                return now
            continue
        if end - start >= lasting:
            return start
    return None


class WindowPolicy(Protocol):
    """What the windows need of `policy` (the full configuration's or the read-only commands' view)."""

    @property
    def windows(self) -> Sequence[str]: ...

    @property
    def windows_for(self) -> str: ...

    @property
    def timezone(self) -> str | None: ...


def policy_windows(policy: WindowPolicy) -> list[Window]:
    return [parse_window(text) for text in policy.windows]


def describe_windows(policy: WindowPolicy, now: float) -> dict[str, Any]:
    """The windows as `status` and the page show them: open or not, until when, when the next opens."""
    tz = zone(policy.timezone)
    windows = policy_windows(policy)
    left = time_left(windows, tz, now) if windows else None
    return {
        "windows": list(policy.windows),
        "timezone": zone_name(tz),
        "windows_for": policy.windows_for,
        "open": left is not None,
        "closes": None if left is None else now + left,
        "next_open": next_opening(windows, tz, now) if windows and left is None else None,
    }


def next_window_open(policy: WindowPolicy, now: float) -> float:
    """`dropgate_window_next_open_timestamp_seconds`: when the next window opens; 0 when one is open or none."""
    if not policy.windows:
        return 0.0
    view = describe_windows(policy, now)
    return 0.0 if view["open"] or view["next_open"] is None else float(view["next_open"])
