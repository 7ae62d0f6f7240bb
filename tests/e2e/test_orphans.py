"""Commands left running by a SIGKILLed daemon: the restart ends them before anything else, and says so.

Each variant starts a long command of a different kind (a migration, a pre- and a
post-apply hook, a service stop, a dump's restore, a dump), kills the daemon for
real while it runs, and starts a new daemon. The command is an *orphan* that
would change the platform's data later (modes, a deleted file, a new file and
folder) once the test lets it go: after the restart it must be dead, the run's
events must say which command was killed, and an operator's rollback must
leave data that stays restored. Without systemd here, the start-up sweep is
the only mechanism at work.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pipeline.sessions import session_members
from tests.conftest import Site, wait_for
from tests.support import tree_digest


class Orphan:
    """A shell snippet that records its pid, waits for `go`, then damages the data like a late migration."""

    def __init__(self, site: Site, name: str) -> None:
        self.site = site
        self.pidfile = site.root / f"{name}.pid"
        self.go = site.root / f"{name}.go"

    def script(self) -> str:
        data = self.site.data
        return (
            f'echo $$ > "{self.pidfile}"\n'
            f'while [ ! -e "{self.go}" ]; do sleep 0.1; done\n'
            f'chmod 0777 "{data}/config"\n'
            f'rm -f "{data}/records.txt"\n'
            f'echo "written late" > "{data}/added-late.txt"\n'
            f'mkdir -p "{data}/late-folder"\n'
        )

    @property
    def pid(self) -> int:
        return int(wait_for(lambda: self.pidfile.exists() and self.pidfile.read_text().strip(), what="the orphan"))

    def alive(self) -> bool:
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def let_go(self) -> None:
        """What would make a surviving orphan change the data now."""
        self.go.touch()

    def cleanup(self) -> None:
        self.go.touch()
        if self.pidfile.exists():
            for member in session_members(self.pid):
                os.kill(member.pid, signal.SIGKILL)


@pytest.fixture
def orphans(site: Site) -> Iterator[list[Orphan]]:
    made: list[Orphan] = []
    yield made
    for orphan in made:
        orphan.cleanup()


def populate(site: Site) -> Path:
    """Data worth restoring (a folder with a mode, a file the orphan deletes) and a database only a dump covers."""
    (site.data / "config").mkdir()
    (site.data / "config" / "app.key").write_text("secret\n")
    (site.data / "config").chmod(0o750)
    database = site.root / "db.sqlite"
    database.write_bytes(b"TABLE patients v1\n" * 100)
    return database


def assert_killed_and_recorded(site: Site, orphan: Orphan, run_id: int, label: str) -> str:
    """The run ended interrupted, the orphan is dead (its whole session), and the run's events name it,
    its pid and how long it ran."""
    assert site.wait_outcome(run_id)["outcome"] == "interrupted"
    pid = orphan.pid
    assert not orphan.alive(), f"the orphan {pid} survived the restart"
    assert session_members(pid) == []
    events = [e["message"] for e in site.show(run_id)["events"]]
    killed = [m for m in events if m.startswith(f"killed {label}") and f"(pid {pid}," in m]
    assert killed, f"no event says {label} (pid {pid}) was killed: {events}"
    assert "left running by the previous daemon: it had run" in killed[0]
    assert "ended by SIGTERM" in killed[0]
    return killed[0]


def assert_stays_restored(site: Site, orphan: Orphan, digest: str) -> None:
    orphan.let_go()
    assert not orphan.alive()
    assert tree_digest(site.data) == digest
    assert not (site.data / "added-late.txt").exists()


def start_then_kill_when(site: Site, orphan: Orphan, archive: Path) -> None:
    daemon = site.start_daemon()
    site.drop(archive)
    assert orphan.pid  # the command is running
    daemon.kill()


@pytest.mark.parametrize("where", ["migration", "pre_apply", "post_apply"])
def test_a_hook_or_migration_left_running_is_killed_at_restart_and_the_rollback_stays(
    site: Site, orphans: list[Orphan], where: str
) -> None:
    # Given an update whose migration or hook changes the data, then keeps running
    populate(site)
    before = tree_digest(site.data)
    orphan = Orphan(site, where)
    orphans.append(orphan)
    script = f'#!/bin/sh\necho "records, migrated" > "{site.data}/records.txt"\n' + orphan.script()
    if where == "migration":
        archive = site.pack("1.0.1", files={"migrations/001.sh": script}, migrations=["migrations/001.sh"])
        label = "migration 1/1 migrations/001.sh"
    else:
        archive = site.pack("1.0.1", files={f"hooks/{where}.sh": script}, hooks={where: f"hooks/{where}.sh"})
        label = f"{where.replace('_', '-')} {where}.sh"
    # When the daemon is SIGKILLed while it runs, and started again
    start_then_kill_when(site, orphan, archive)
    assert orphan.alive()  # an orphan indeed, until the restart
    site.start_daemon()
    # Then the run is interrupted, the command was killed before anything else, and the events say so
    assert_killed_and_recorded(site, orphan, 1, label)
    events = [e["message"] for e in site.show(1)["events"]]
    killed_at = next(i for i, m in enumerate(events) if m.startswith("killed "))
    settled_at = next(i for i, m in enumerate(events) if m.startswith("the daemon stopped during apply"))
    assert killed_at < settled_at
    # And the operator's rollback restores data that stays restored
    result = site.cli("rollback", "1")
    assert result.returncode == 0, result.stderr
    assert site.run(1)["outcome"] == "rolled_back"  # type: ignore[index]
    assert_stays_restored(site, orphan, before)
    assert os.readlink(site.platform / "current") == "releases/1.0.0"


def test_a_service_stop_left_running_is_killed_and_the_rollback_starts_the_services(
    site: Site, orphans: list[Orphan]
) -> None:
    # Given a minor update (downtime) whose stop command hangs
    populate(site)
    orphan = Orphan(site, "stop")
    orphans.append(orphan)
    started = site.root / "services-started"
    site.write_config(
        platform={"services": {"stop": [{"shell": orphan.script()}], "start": [["touch", str(started)]]}}
    )
    # When the daemon dies during the stop and comes back
    start_then_kill_when(site, orphan, site.pack("1.1.0"))
    before = tree_digest(site.data)  # nothing changed the data so far
    site.start_daemon()
    assert_killed_and_recorded(site, orphan, 1, "stop 1/1")
    # Then the rollback starts the services and removes the flag, and the data stays as it was
    result = site.cli("rollback", "1")
    assert result.returncode == 0, result.stderr
    assert started.exists()
    assert not (site.root / "run" / "maintenance").exists()
    assert_stays_restored(site, orphan, before)


def test_a_restore_left_running_is_killed_and_the_operators_rollback_restores_the_database(
    site: Site, orphans: list[Orphan]
) -> None:
    # Given an update whose migration fails after changing the database, and a dump whose first
    # restore hangs (an automatic rollback is under way when the daemon dies), the next one works
    database = populate(site)
    data_before, database_before = tree_digest(site.data), database.read_bytes()
    orphan = Orphan(site, "restore")
    orphans.append(orphan)
    count = site.root / "restores"
    restore = (
        f'n=$(cat "{count}" 2>/dev/null || echo 0); echo $((n + 1)) > "{count}"\n'
        f'if [ "$n" = 0 ]; then\n{orphan.script()}echo CORRUPTED > "{database}"\n'
        f'else cat > "{database}"; fi\n'
    )
    site.write_config(
        backup={"dumps": [{"name": "db", "command": ["cat", str(database)], "restore": {"shell": restore}}]}
    )
    migration = f'#!/bin/sh\necho "TABLE patients v2" >> "{database}"\nexit 1\n'
    archive = site.pack("1.0.1", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"])
    # When the daemon dies while the restore runs, and starts again
    start_then_kill_when(site, orphan, archive)
    site.start_daemon()
    assert_killed_and_recorded(site, orphan, 1, "restore db")
    # Then the operator's rollback restores the data and the database, and they stay restored
    result = site.cli("rollback", "1")
    assert result.returncode == 0, result.stderr
    assert site.run(1)["outcome"] == "rolled_back"  # type: ignore[index]
    assert database.read_bytes() == database_before
    assert_stays_restored(site, orphan, data_before)
    assert database.read_bytes() == database_before


def test_a_dump_left_running_is_killed_and_nothing_needs_rolling_back(site: Site, orphans: list[Orphan]) -> None:
    # Given a backup whose dump hangs
    populate(site)
    orphan = Orphan(site, "dump")
    orphans.append(orphan)
    site.write_config(backup={"dumps": [{"name": "db", "command": {"shell": orphan.script()}}]})
    # When the daemon dies during the dump and starts again
    start_then_kill_when(site, orphan, site.pack("1.0.1"))
    before = tree_digest(site.data)
    site.start_daemon()
    # Then the dump is dead and recorded; the run changed nothing, so a rollback refuses and says why
    assert_killed_and_recorded(site, orphan, 1, "dump db")
    refused = site.cli("rollback", "1")
    assert refused.returncode == 1
    assert "did not change the platform" in refused.stderr
    assert_stays_restored(site, orphan, before)


def test_a_command_that_ended_while_the_daemon_was_down_is_reported_not_killed(site: Site) -> None:
    # Given a migration that ends by itself soon after the daemon is killed
    hold, pidfile = site.root / "hold", site.root / "migration.pid"
    hold.touch()
    script = f'#!/bin/sh\necho $$ > "{pidfile}"\nwhile [ -e "{hold}" ]; do sleep 0.1; done\n'
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1", files={"migrations/001.sh": script}, migrations=["migrations/001.sh"]))
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the migration"))
    daemon.kill()
    hold.unlink()
    wait_for(lambda: not session_members(pid), what="the migration to end by itself")
    # When the daemon starts again
    site.start_daemon()
    # Then the run's events say the migration was running when the daemon died and had ended since
    site.wait_outcome(1)
    events = [e["message"] for e in site.show(1)["events"]]
    assert any(
        m.startswith(f"migration 1/1 migrations/001.sh (pid {pid},") and "was no longer running at this start" in m
        for m in events
    ), events
