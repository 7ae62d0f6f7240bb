"""The waiting steps: `approval` and `window`, driven with an injected clock (STYLE item 10).

The windows' arithmetic (zones, DST nights, midnight) is tested in test_schedule.py;
here: what the steps do with it, `policy.windows_for`, an operator's rejection
and `policy.approval_expires`.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from pipeline.config import parse_config
from pipeline.context import StepContext
from pipeline.errors import ApprovalExpired, RejectedByOperator, StepAborted
from states import approval, window
from tests.support import RecordingReporter

PARIS = ZoneInfo("Europe/Paris")
MONDAY_8 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=PARIS)  # a Monday, 08:00 in Paris


def context(tmp_path: Path, *, now: Any, facts: dict[str, Any] | None = None, **config: Any) -> StepContext:
    config.setdefault("policy", {}).setdefault("timezone", "Europe/Paris")
    cfg = parse_config({"platform": {"product": "gts", "root": str(tmp_path / "platform")}, **config}, base=tmp_path)
    clock = now if callable(now) else (lambda: now)
    return StepContext(
        run_id=1, step="window", archive=tmp_path / "a.tgz", archive_name="a.tgz", sha256="", config=cfg,
        facts=facts or {}, reporter=RecordingReporter(), now=clock,
    )


def events(ctx: StepContext) -> list[str]:
    return list(ctx.reporter.events)  # type: ignore[attr-defined]


# -- window --------------------------------------------------------------------------


def test_a_run_inside_an_open_window_goes_on(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=MONDAY_8.timestamp(), facts={"downtime": True},
                  policy={"windows": ["Mon-Tue 07:00-12:00"]})
    window.run(ctx)
    assert events(ctx) == ["maintenance window open (240 min left)"]
    assert "window_waiting" not in ctx.reporter.facts  # type: ignore[attr-defined]


def test_a_run_that_waited_before_a_restart_says_it_no_longer_waits_once_its_window_opens(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=MONDAY_8.timestamp(), facts={"downtime": True, "window_waiting": True},
                  policy={"windows": ["Mon-Tue 07:00-12:00"]})
    window.run(ctx)
    assert ctx.reporter.facts["window_waiting"] is False  # type: ignore[attr-defined]


def test_a_downtime_that_would_overrun_the_window_waits_and_says_when_one_that_fits_opens(tmp_path: Path) -> None:
    # Given a window with 4 h left on Monday (5 h on Tuesday) and earlier runs whose downtime took 5.5 h
    ctx = context(
        tmp_path, now=MONDAY_8.timestamp(), facts={"downtime": True, "expected_downtime_seconds": 5.5 * 3600},
        policy={"windows": ["Mon-Tue 07:00-12:00", "Sat 22:00-Sun 04:00"]},
    )
    ctx.cancel.cancel("the daemon is stopping", resumable=True)  # end the wait after the first look
    # When the step looks, it does not start, says why, and names the first window long enough
    with pytest.raises(StepAborted):
        window.run(ctx)
    (message,) = events(ctx)
    assert "would overrun the open window (14400s left)" in message
    assert "the next that fits opens 2026-11-28 22:00:00 CET" in message  # Saturday night: 6 h
    assert ctx.reporter.facts["window_next_open"] == dt.datetime(2026, 11, 28, 22, tzinfo=PARIS).timestamp()  # type: ignore[attr-defined]


def test_a_closed_window_names_the_next_opening_in_the_policy_zone(tmp_path: Path) -> None:
    sunday_noon = dt.datetime(2026, 11, 22, 12, 0, tzinfo=PARIS)
    ctx = context(tmp_path, now=sunday_noon.timestamp(), facts={"downtime": True},
                  policy={"windows": ["Mon-Tue 07:00-12:00"]})
    ctx.cancel.cancel("stop", resumable=True)
    with pytest.raises(StepAborted):
        window.run(ctx)
    assert events(ctx) == [
        "waiting for a window (Mon-Tue 07:00-12:00, Europe/Paris): no window is open; "
        "the next that fits opens 2026-11-23 07:00:00 CET"
    ]
    assert ctx.reporter.facts["window_waiting"] is True  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("windows_for", "downtime", "waits"),
    [("downtime", True, True), ("downtime", False, False), ("all", False, True), ("all", True, True)],
)
def test_windows_for_says_which_runs_wait(tmp_path: Path, windows_for: str, downtime: bool, waits: bool) -> None:
    config = parse_config(
        {"platform": {"product": "gts", "root": "/srv"},
         "policy": {"windows": ["Sat 22:00-Sun 04:00"], "windows_for": windows_for}},
        base=tmp_path,
    )
    assert window.required(config, {"downtime": downtime}) is waits


def test_without_windows_no_run_waits(tmp_path: Path) -> None:
    config = parse_config({"platform": {"product": "gts", "root": "/srv"}, "policy": {"windows_for": "all"}},
                          base=tmp_path)
    assert window.required(config, {"downtime": True}) is False


def rejected_while_waiting(ctx: StepContext, step: Callable[[StepContext], None], who: str, note: str) -> str:
    """Run a waiting step that an operator rejects 0.3 s in, as the runner does on `dropgate reject 1 --note ...`.

    The step must end with RejectedByOperator; its message.
    """

    def reject() -> None:
        ctx.facts.update(rejected_by=who, rejected_note=note)
        ctx.cancel.cancel(f"rejected by {who}")

    timer = threading.Timer(0.3, reject)
    timer.start()
    try:
        with pytest.raises(RejectedByOperator) as caught:
            step(ctx)
    finally:
        timer.join()
    return str(caught.value)


def test_a_run_waiting_for_its_window_that_an_operator_rejects_ends_rejected_with_who_and_note(
    tmp_path: Path,
) -> None:
    ctx = context(tmp_path, now=dt.datetime(2026, 11, 22, 12, 0, tzinfo=PARIS).timestamp(),
                  facts={"downtime": True}, policy={"windows": ["Mon-Tue 07:00-12:00"]})
    message = rejected_while_waiting(ctx, window.run, "alice (pid 42)", "not before the audit")
    assert "rejected by the operator alice (pid 42): not before the audit" in message


def test_a_window_step_stopped_by_a_shutdown_is_not_a_rejection(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=dt.datetime(2026, 11, 22, 12, 0, tzinfo=PARIS).timestamp(),
                  facts={"downtime": True}, policy={"windows": ["Mon-Tue 07:00-12:00"]})
    ctx.cancel.cancel("the daemon is stopping", resumable=True)
    with pytest.raises(StepAborted) as caught:
        window.run(ctx)
    assert not isinstance(caught.value, RejectedByOperator) and caught.value.resumable


# -- approval --------------------------------------------------------------------------


def test_approval_waits_for_the_operator_then_goes_on(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=1000.0, facts={"prereq_at": 990.0}, policy={"require_approval": True})
    ctx.step = "approval"
    timer = threading.Timer(0.3, lambda: ctx.facts.update(approved_at=1000.0))
    timer.start()
    approval.run(ctx)
    timer.join()
    assert events(ctx) == ["waiting for an operator: dropgate approve 1"]
    assert ctx.reporter.facts["approval_asked_at"] == 1000.0  # type: ignore[attr-defined]


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
    assert events(ctx)[0] == "the pre-checks are older than a day: running them again before going on"
    assert len(events(ctx)) > 1


class Clock:
    """A clock the test moves: each reading advances it by `step` seconds."""

    def __init__(self, start: float, step: float) -> None:
        self.now, self.step = start, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_an_approval_that_does_not_come_in_time_rejects_the_run_with_that_reason(tmp_path: Path) -> None:
    # Given approvals expire after 3 days, and a clock that runs half a day per look
    ctx = context(tmp_path, now=Clock(1_000_000.0, 43200.0), facts={"prereq_at": 999_000.0},
                  policy={"require_approval": True, "approval_expires": "3d"})
    ctx.step = "approval"
    # When nobody approves
    with pytest.raises(ApprovalExpired) as caught:
        approval.run(ctx)
    # Then the run is rejected, the reason names the setting and how to queue it again
    assert str(caught.value) == (
        "not approved within 3d (policy.approval_expires): rejected; `dropgate retry 1` queues it again"
    )
    assert events(ctx) == ["waiting for an operator: dropgate approve 1 (rejected if not approved within 3d)"]


def test_the_approval_wait_is_not_reset_by_a_restart(tmp_path: Path) -> None:
    # Given a run that started waiting for its approval 4 days ago (before a restart)
    ctx = context(tmp_path, now=1_000_000.0, facts={"approval_asked_at": 1_000_000.0 - 4 * 86400},
                  policy={"require_approval": True, "approval_expires": "3d"})
    ctx.step = "approval"
    # When the step resumes, it rejects at once
    with pytest.raises(ApprovalExpired):
        approval.run(ctx)


def test_an_approval_given_just_in_time_goes_on(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=1_000_000.0, facts={"approval_asked_at": 1_000_000.0 - 3 * 86400 + 60,
                                                    "prereq_at": 999_990.0},
                  policy={"require_approval": True, "approval_expires": "3d"})
    ctx.step = "approval"
    timer = threading.Timer(0.2, lambda: ctx.facts.update(approved_at=1_000_000.0))
    timer.start()
    approval.run(ctx)
    timer.join()


def test_a_run_waiting_for_approval_that_an_operator_rejects_ends_rejected(tmp_path: Path) -> None:
    ctx = context(tmp_path, now=1000.0, facts={"prereq_at": 990.0}, policy={"require_approval": True})
    ctx.step = "approval"
    message = rejected_while_waiting(ctx, approval.run, "bob (pid 7)", "wrong customer")
    assert "rejected by the operator bob (pid 7): wrong customer" in message
