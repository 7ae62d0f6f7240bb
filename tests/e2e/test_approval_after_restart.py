"""A restart is never an approval: a resumed run waits for `dropgate approve` again.

The approval given before the restart is recorded as void in the run's
events (who, when, why). Variants: SIGKILL and SIGTERM while the approved run
waits for its window; SIGKILL while it still waits for approval.
"""

from __future__ import annotations

import datetime as dt
import signal

import pytest

from pipeline.schedule import DAYS
from tests.conftest import Site


def closed_window() -> str:
    """A one-minute window on a day three days from today: closed for the whole test."""
    day = DAYS[(dt.datetime.now().weekday() + 3) % 7]
    return f"{day} 03:00-03:01"


def messages(site: Site, run_id: int) -> list[str]:
    return [e["message"] for e in site.show(run_id)["events"]]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_approved_run_caught_in_its_window_waits_for_approval_again(site: Site, how: str) -> None:
    # Given a run approved by the operator and waiting for its window
    site.write_config(policy={"require_approval": True, "windows": [closed_window()], "windows_for": "all"})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    approved = site.cli("approve", "1")
    assert approved.returncode == 0, approved.stderr
    site.wait_step(1, "window")
    # When the daemon is killed (or stopped) and started again
    if how == "SIGKILL":
        daemon.kill()
    else:
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=60) == 0
    site.start_daemon()
    # Then the run waits in approval again: the earlier approval is void, and the events say so
    run = site.wait_step(1, "approval")
    assert run["outcome"] is None
    void = [m for m in messages(site, 1) if "is void" in m]
    assert len(void) == 1
    assert void[0].startswith("the approval by ") and "the daemon restarted" in void[0]
    assert "dropgate approve 1" in void[0]
    assert "approved_at" not in site.show(1)["facts"]
    # And a new approval lets it go on to its window
    again = site.cli("approve", "1")
    assert again.returncode == 0, again.stderr
    site.wait_step(1, "window")
    assert sum(1 for m in messages(site, 1) if m.startswith("approved by ")) == 2


def test_a_run_killed_before_its_approval_still_waits_and_nothing_is_void(site: Site) -> None:
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    daemon.kill()
    site.start_daemon()
    site.wait_step(1, "approval")
    assert not any("is void" in m for m in messages(site, 1))
    assert site.cli("approve", "1").returncode == 0
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"
