"""Crash safety and the gate's latch, with the real daemon killed for real.

A long step is a backup dump command that sleeps while a `hold` file exists
(SPEC: a restart is never an operator's command, so nothing may run again).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import Site, wait_for


@pytest.fixture
def slow_backup(site: Site) -> Path:
    """Make the backup step hang in a dump while `hold` exists; each start of the dump is counted."""
    hold = site.root / "hold"
    hold.touch()
    marker = site.root / "dump-starts"
    pidfile = site.root / "dump.pid"
    script = f'echo started >> "{marker}"; echo $$ > "{pidfile}"; while [ -e "{hold}" ]; do sleep 0.1; done; echo dump'
    site.write_config(backup={"dumps": [{"name": "slow", "command": {"shell": script}}]})
    yield marker
    hold.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.killpg(int(pidfile.read_text()), signal.SIGKILL)  # an orphan of a SIGKILLed daemon


def test_sigkill_during_backup_gives_interrupted_blocks_the_gate_and_runs_nothing_again(
    site: Site, slow_backup: Path
) -> None:
    # Given a patch whose run is in the backup step, its dump running
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "backup")
    wait_for(slow_backup.exists, what="the dump to start")
    assert site.metric("dropgate_step", 'dropgate_step="backup"') == 1.0
    assert site.metric("dropgate_gate", 'dropgate_gate="busy"') == 1.0
    started = site.metric("dropgate_step_started_timestamp_seconds") or 0
    assert 0 < started < (site.metric("dropgate_step_deadline_timestamp_seconds") or 0)
    # When the daemon is killed without warning and started again
    daemon.kill()
    site.start_daemon()
    # Then the run is interrupted, the gate blocked, the operator told what to do
    run = site.wait_outcome(1)
    assert run["outcome"] == "interrupted"
    assert "the daemon stopped during backup (the platform was not changed yet)" in run["error"]
    assert "nothing to roll back" in run["error"] and "dropgate resolve 1" in run["error"]
    assert "dropgate rollback 1" not in run["error"]  # it would refuse: nothing was changed
    status = site.status()
    assert status["gate"] == "blocked"
    assert site.metric("dropgate_blocked") == 1.0
    assert site.metric("dropgate_gate", 'dropgate_gate="blocked"') == 1.0
    # and nothing was run again: the dump started exactly once
    (site.root / "hold").unlink()
    assert slow_backup.read_text().splitlines() == ["started"]
    # A new drop while blocked is recorded as queued, visibly, and not processed
    site.drop(site.pack("1.0.2"))
    wait_for(lambda: site.status()["queued"], what="the new archive to be queued")
    status = site.status()
    assert [q["archive"] for q in status["queued"]] == ["gts.1.0.2.tgz"]
    assert site.run(2)["step"] == "queued"  # type: ignore[index]
    assert "BLOCKED by run 1" in site.cli("status").stdout
    # When the operator resolves run 1, the gate opens and run 2 goes through
    result = site.cli("resolve", "1", "--note", "checked the platform by hand")
    assert result.returncode == 0, result.stderr
    assert "the gate is open" in result.stdout
    second = site.wait_outcome(2, timeout=120)
    assert second["outcome"] == "succeeded", second["error"]
    assert site.status()["installed_version"] == "1.0.2"
    shown = site.show(1)
    assert shown["resolved_note"] == "checked the platform by hand"


def test_sigkill_before_backup_resumes_the_run_where_it_was(site: Site) -> None:
    # Given a run waiting for approval
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    # When the daemon dies and comes back
    daemon.kill()
    site.start_daemon()
    # Then the run resumes (validated again) and waits for its approval again
    site.wait_step(1, "approval")
    events = [e["message"] for e in site.show(1)["events"]]
    assert any("the daemon restarted during approval" in m for m in events)
    assert sum(1 for m in events if m == "validate started (time limit 30m)") == 2
    # and the approval lets it finish
    result = site.cli("approve", "1")
    assert result.returncode == 0, result.stderr
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"


def test_sigterm_while_waiting_stops_at_once_and_the_run_resumes(site: Site) -> None:
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    assert daemon.stop(timeout=20) == 0
    run = site.run(1)
    assert run is not None and run["step"] == "queued" and run["outcome"] is None
    assert any("resumes from validate" in e["message"] for e in site.show(1)["events"])


def test_a_second_sigterm_aborts_the_step_and_the_run_is_interrupted(site: Site, slow_backup: Path) -> None:
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "backup")
    wait_for(slow_backup.exists, what="the dump to start")
    daemon.proc.send_signal(signal.SIGTERM)
    # the first SIGTERM lets the step go on towards its safe point
    wait_for(lambda: "stopping at a safe point" in daemon.output(), what="the daemon to acknowledge SIGTERM")
    assert daemon.alive()
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=30) == 0
    run = site.run(1)
    assert run is not None and run["outcome"] == "interrupted"
    assert "aborted by a second SIGTERM" in run["error"]
    pid = int((site.root / "dump.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_step_past_its_time_limit_fails_and_its_commands_are_killed(site: Site, slow_backup: Path) -> None:
    site.write_config(policy={"timeouts": {"backup": "2s"}})
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    run = site.wait_outcome(1, timeout=60)
    assert run["outcome"] == "failed"
    assert "dump slow was still running at the step's time limit and was killed" in run["error"]
    pid = int((site.root / "dump.pid").read_text())
    wait_for(lambda: not psutil.pid_exists(pid), what="the dump to be killed")
    assert site.status()["gate"] == "blocked"
    # nothing on the platform was touched
    assert site.status()["installed_version"] == "1.0.0"
    assert run["platform_changed"] is False


def test_archives_of_old_successes_are_pruned_like_their_releases(site: Site) -> None:
    # Given keep_releases: 1 and two successful updates
    site.write_config(platform={"keep_releases": 1})
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"
    site.drop(site.pack("1.0.2"))
    assert site.wait_outcome(2, timeout=120)["outcome"] == "succeeded"
    # Then only the latest success keeps its archive; the event says why the other went
    assert not (site.state / "spool" / "1").exists()
    assert (site.state / "spool" / "2" / "gts.1.0.2.tgz").is_file()
    assert any("its release is no longer kept" in e["message"] for e in site.show(1)["events"])
