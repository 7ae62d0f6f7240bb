"""`window`: wait until an allowed maintenance window is open (only when policy.windows is set).

Windows are read in `policy.timezone` (pipeline/schedule.py says what happens
on the two DST nights). With `policy.windows_for: downtime` (the default) only
a run that needs downtime waits; with `all`, every run does. A run that needs
downtime does not start when the last comparable runs say its downtime would
overrun what is left of the window: it waits for a window long enough. An
operator may refuse a waiting run (`dropgate reject ID --note ...`).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.context import StepContext
from pipeline.schedule import Window, local_text, next_opening, policy_windows, time_left, zone, zone_name
from states.approval import ended_by_rejection

POLL_SECONDS = 5.0


def windows_of(config: Config) -> list[Window]:
    return policy_windows(config.policy)


def required(config: Config, facts: dict[str, Any]) -> bool:
    if not config.policy.windows:
        return False
    return config.policy.windows_for == "all" or bool(facts.get("downtime"))


def run(ctx: StepContext) -> None:
    with ended_by_rejection(ctx):
        _wait_for_window(ctx)


def _wait_for_window(ctx: StepContext) -> None:
    tz = zone(ctx.config.policy.timezone)
    windows = windows_of(ctx.config)
    expected = float(ctx.facts.get("expected_downtime_seconds") or 0.0) if ctx.facts.get("downtime") else 0.0
    announced = False
    while True:
        now = ctx.now()
        left = time_left(windows, tz, now)
        if left is not None and left >= expected:
            if announced or ctx.facts.get("window_waiting"):
                ctx.save_facts(window_waiting=False)
            ctx.event(f"maintenance window open ({left / 60:.0f} min left)")
            return
        opens = next_opening(windows, tz, now, lasting=expected)
        if not announced:
            why = (
                "no window is open"
                if left is None
                else (f"the expected downtime ({expected:.0f}s) would overrun the open window ({left:.0f}s left)")
            )
            when = f"; the next that fits opens {local_text(opens, tz)}" if opens else "; no window within a week fits"
            ctx.event(f"waiting for a window ({', '.join(ctx.config.policy.windows)}, {zone_name(tz)}): {why}{when}")
            ctx.save_facts(window_next_open=opens, window_waiting=True)
            announced = True
        ctx.wait(min(POLL_SECONDS, max(0.5, opens - now)) if opens else POLL_SECONDS)
