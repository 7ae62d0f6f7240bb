"""The waiting steps: `approval` and `window`, driven with an injected clock (STYLE item 10)."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import parse_config
from pipeline.context import StepContext
from pipeline.errors import StepAborted
from states import approval, window
from states.window import Window, open_window
from tests.support import RecordingReporter


def context(tmp_path: Path, *, now: float, facts: dict[str, Any] | None = None, **config: Any) -> StepContext:
    cfg = parse_config({"platform": {"product": "gts", "root": str(tmp_path / "platform")}, **config}, base=tmp_path)
    return StepContext(
        run_id=1, step="window", archive=tmp_path / "a.tgz", archive_name="a.tgz", sha256="", config=cfg,
        facts=facts or {}, reporter=RecordingReporter(), now=lambda: now,
    )


MONDAY_8 = dt.datetime(2026, 11, 23, 8, 0)  # a Monday


def test_a_window_is_open_on_its_days_between_its_hours() -> None:
    early_week = Window.parse("Mon-Tue 07:00-12:00")
    assert early_week.remaining(MONDAY_8) == 4 * 3600
    assert early_week.remaining(MONDAY_8.replace(hour=12)) is None
    assert early_week.remaining(MONDAY_8 + dt.timedelta(days=2)) is None  # Wednesday
    weekend = Window.parse("Sat-Sun 22:00-23:30")
    assert open_window([early_week, weekend], MONDAY_8 + dt.timedelta(days=5, hours=14, minutes=30)) == 3600


def test_a_run_inside_an_open_window_goes_on(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=MONDAY_8.timestamp(), policy={"windows": ["Mon-Tue 07:00-12:00"]})
    window.run(ctx)
    assert ctx.reporter.events == ["maintenance window open (240 min left)"]  # type: ignore[attr-defined]


def test_a_downtime_that_would_overrun_the_window_waits(tmp_path: Path) -> None:
    # Given a window with 4 h left and earlier runs whose downtime took 5 h
    ctx = context(
        tmp_path, now=MONDAY_8.timestamp(), facts={"downtime": True, "expected_downtime_seconds": 5 * 3600},
        policy={"windows": ["Mon-Tue 07:00-12:00"]},
    )
    ctx.cancel.cancel("the daemon is stopping", resumable=True)  # end the wait after the first look
    # When the step looks, it does not start, and says why
    with pytest.raises(StepAborted):
        window.run(ctx)
    events = ctx.reporter.events  # type: ignore[attr-defined]
    assert "would overrun the open window" in events[0]


def test_approval_waits_for_the_operator_then_goes_on(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=1000.0, facts={"prereq_at": 990.0}, policy={"require_approval": True})
    ctx.step = "approval"
    timer = threading.Timer(0.3, lambda: ctx.facts.update(approved_at=1000.0))
    timer.start()
    approval.run(ctx)
    timer.join()
    assert ctx.reporter.events == ["waiting for an operator: dropgate approve 1"]  # type: ignore[attr-defined]


def test_an_approval_given_on_day_old_prechecks_runs_them_again(tmp_path: Path) -> None:
    # Given pre-checks two days old and an approval already given
    ctx = context(
        tmp_path, now=200_000.0, facts={"prereq_at": 10.0, "approved_at": 199_000.0},
        prereq={"min_cpus": 1, "recommended_cpus": 1, "min_memory_gib": 0.1, "recommended_memory_gib": 0.1,
                "min_free_percent": 0},
    )
    (tmp_path / "platform" / "releases" / "1.0").mkdir(parents=True)
    (tmp_path / "platform" / "current").symlink_to("releases/1.0")
    ctx.step = "approval"
    approval.run(ctx)
    events = ctx.reporter.events  # type: ignore[attr-defined]
    assert events[0] == "the pre-checks are older than a day: running them again before going on"
    assert len(events) > 1
