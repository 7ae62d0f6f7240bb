"""Writing the maintenance flag and stopping services change the platform; a rollback undoes them.

The real daemon is killed (SIGKILL) at each point of a downtime update:
during the stop command, just after the flag was written (the stop command
kills the daemon before stopping anything), during apply and during verify;
and with `policy.on_failure: hold` a failed stop is left for the operator.
Each time the restart message and `status` say exactly what was changed, and
`dropgate rollback` brings the services and the page back (restoring data
only when apply had begun).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.sessions import session_members
from tests.conftest import Site, wait_for
from tests.support import tree_digest


class Platform:
    """Stop and start commands that leave marks, and a switch that makes one of the steps hang."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.flag = site.root / "run" / "maintenance"
        self.started = site.root / "services-started"
        self.go = site.root / "go"
        self.pidfile = site.root / "hung.pid"
        self.records = site.data / "records.txt"

    def hang(self, before: str = "") -> str:
        return f'{before}echo $$ > "{self.pidfile}"\nwhile [ ! -e "{self.go}" ]; do sleep 0.1; done\n'

    def configure(self, stop: str, **extra: object) -> None:
        self.site.write_config(
            platform={"services": {"stop": [{"shell": stop}], "start": [["touch", str(self.started)]]}}, **extra
        )

    def hung_pid(self) -> int:
        return int(wait_for(lambda: self.pidfile.exists() and self.pidfile.read_text().strip(), what="the hang"))

    def cleanup(self) -> None:
        self.go.touch()
        if self.pidfile.exists():
            for member in session_members(int(self.pidfile.read_text())):
                os.kill(member.pid, 9)


@pytest.fixture
def platform(site: Site) -> Iterator[Platform]:
    made = Platform(site)
    yield made
    made.cleanup()


def restart_after_kill(site: Site, platform: Platform, archive: Path, *, kill_in_command: bool = False) -> dict:
    daemon = site.start_daemon()
    site.drop(archive)
    if kill_in_command:
        wait_for(lambda: not daemon.alive(), timeout=120, what="the stop command to kill the daemon")
        daemon.kill()
    else:
        platform.hung_pid()
        daemon.kill()
    assert platform.flag.exists()  # maintenance is on: visitors get the 503 page
    site.start_daemon()
    return site.wait_outcome(1)


def rollback(site: Site) -> dict:
    result = site.cli("rollback", "1")
    assert result.returncode == 0, result.stderr
    run = site.run(1)
    assert run is not None and run["outcome"] == "rolled_back", run
    return run


def test_killed_during_the_stop_command_rollback_starts_the_services_and_removes_the_flag(
    site: Site, platform: Platform
) -> None:
    # Given a downtime update whose stop command writes to the data (as users did since the backup), then hangs
    platform.configure(platform.hang(before=f'echo "written after the backup" >> "{platform.records}"\n'))
    # When the daemon is killed while the stop command runs, and started again
    run = restart_after_kill(site, platform, site.pack("1.1.0"))
    # Then the restart says exactly what was changed and what the rollback will do
    assert run["outcome"] == "interrupted"
    assert run["platform_changed"] is True
    assert (
        "the daemon stopped during maintenance (the platform WAS changed: maintenance flag on, services being "
        "stopped (stop 1/1 had started, 0 finished); apply had not begun (release and data untouched); "
        "maintenance is still ON)" in run["error"]
    )
    assert "`dropgate rollback 1` (rollback starts the services and removes the maintenance flag" in run["error"]
    status = site.status()
    assert status["run"]["platform"].startswith("changed — maintenance flag on, services being stopped")
    assert "rollback starts the services and removes the flag" in status["run"]["platform"]
    assert "maintenance ON" in site.cli("status").stdout
    # When the operator rolls back
    run = rollback(site)
    # Then the services were started, the flag is gone, the data was not restored over later writes
    assert platform.started.exists()
    assert not platform.flag.exists()
    assert platform.records.read_text().endswith("written after the backup\n")
    assert run["platform_changed"] is False and run["maintenance"] is False
    assert run["error"].startswith("the daemon stopped during maintenance (the platform WAS changed")
    assert "— rolled back by root (pid " in run["error"]
    assert run["error"].endswith(
        "): services started and the maintenance flag removed; the data was not restored (apply had not begun)"
    )
    assert "Next:" not in run["error"]
    events = [e["message"] for e in site.show(1)["events"]]
    assert any("undoing what maintenance changed: maintenance flag on, services being stopped" in m for m in events)
    assert any(m.startswith("maintenance off after") and "services started" in m for m in events)
    # And after resolve, the update can be run again and succeeds (nothing was left half-stopped)
    platform.go.touch()
    assert site.cli("resolve", "1", "--note", "stop command fixed").returncode == 0
    assert site.cli("retry", "1").returncode == 0
    assert site.wait_outcome(2, timeout=120)["outcome"] == "succeeded"


def test_killed_just_after_the_flag_was_written_rollback_removes_it(site: Site, platform: Platform) -> None:
    # Given a stop command that kills the daemon before it stops anything (the flag is already written)
    platform.configure('kill -KILL "$PPID"')
    data_before = tree_digest(site.data)
    # When the daemon dies there and starts again
    run = restart_after_kill(site, platform, site.pack("1.1.0"), kill_in_command=True)
    # Then the flag counts as a change, and the rollback removes it and starts the services
    assert run["outcome"] == "interrupted"
    assert "the platform WAS changed: maintenance flag on" in run["error"]
    assert "maintenance is still ON" in run["error"]
    rollback(site)
    assert not platform.flag.exists()
    assert platform.started.exists()
    assert tree_digest(site.data) == data_before
    assert os.readlink(site.platform / "current") == "releases/1.0.0"


@pytest.mark.parametrize("step", ["apply", "verify"])
def test_killed_during_apply_or_verify_rollback_restores_release_data_services_and_page(
    site: Site, platform: Platform, step: str
) -> None:
    # Given a downtime update whose migration changes the data; it hangs in a migration or a verify check
    platform.configure("true")
    data_before = tree_digest(site.data)
    change = f'echo "records, migrated" > "{platform.records}"\n'
    if step == "apply":
        migration = "#!/bin/sh\n" + platform.hang(before=change)
    else:
        migration = "#!/bin/sh\n" + change
        # the check hangs only on the new release (prereq runs the same checks before the update)
        check = f'grep -q migrated "{platform.records}" || exit 0\n' + platform.hang()
        site.write_config(verify={"commands": [{"shell": check}]})
    archive = site.pack("1.1.0", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"])
    # When the daemon is killed there and started again
    run = restart_after_kill(site, platform, archive)
    # Then the restart names every change so far
    assert run["outcome"] == "interrupted"
    assert (
        f"the daemon stopped during {step} (the platform WAS changed: apply had begun; maintenance flag on, "
        "services stopped (1 stop command ran); maintenance is still ON)" in run["error"]
    )
    assert "rollback puts the previous release back, restores the data and dumps, and leaves maintenance" in (
        run["error"]
    )
    # (the hung migration or check itself was killed at the restart, before anything else)
    label = "migration 1/1 migrations/001.sh" if step == "apply" else "check 1/1"
    events = [e["message"] for e in site.show(1)["events"]]
    assert any(m.startswith(f"killed {label} (pid {platform.hung_pid()},") for m in events), events
    # And the rollback brings all of it back
    rollback(site)
    assert tree_digest(site.data) == data_before
    assert os.readlink(site.platform / "current") == "releases/1.0.0"
    assert platform.started.exists()
    assert not platform.flag.exists()


def test_with_policy_hold_a_failed_stop_is_left_and_the_rollback_undoes_it(site: Site, platform: Platform) -> None:
    # Given policy hold and a stop command that fails
    platform.configure("exit 1", policy={"on_failure": "hold"})
    site.start_daemon()
    site.drop(site.pack("1.1.0"))
    run = site.wait_outcome(1, timeout=120)
    # Then the run failed, maintenance stays on for inspection, and the status says what was changed
    assert run["outcome"] == "failed"
    assert "stop 1/1 failed with exit code 1" in run["error"]
    assert platform.flag.exists()
    assert run["platform_changed"] is True
    assert run["platform"].startswith("changed — maintenance flag on, services being stopped (stop 1/1 had started")
    # When the operator rolls back, the services are started and the page is back
    rollback(site)
    assert platform.started.exists()
    assert not platform.flag.exists()
    assert site.status()["gate"] == "blocked"  # until the operator resolves
