"""The journal is the memory of the gate: lost or damaged, the daemon refuses to start.

A site that ran updates is left with a blocked run (SIGKILL in backup), then its
journal is deleted, emptied, replaced by garbage or truncated. The daemon must
refuse with exit code 5 and one message naming what it found and what to do,
never touching the journal file; `status`, `history` and `show` must not say
idle. A truly fresh site starts normally, and `--fresh-journal` starts afresh
on purpose, recorded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, Site, wait_for

EXIT_NO_JOURNAL = 5


@pytest.fixture
def used_site(site: Site) -> Iterator[Site]:
    """A site with history: one update succeeded, the next was interrupted in backup and blocks the gate."""
    hold, pidfile = site.root / "hold", site.root / "dump.pid"
    script = f'echo $$ > "{pidfile}"; while [ -e "{hold}" ]; do sleep 0.1; done'
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    assert site.wait_outcome(1, timeout=120)["outcome"] == "succeeded"
    daemon.stop()
    hold.touch()
    site.write_config(backup={"dumps": [{"name": "db", "command": {"shell": script}}]})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.2"))
    wait_for(pidfile.exists, timeout=120, what="the dump")
    daemon.kill()
    hold.unlink()
    daemon = site.start_daemon()
    assert site.wait_outcome(2)["outcome"] == "interrupted"
    assert site.status()["gate"] == "blocked"
    daemon.stop()
    yield site
    with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
        os.killpg(int(pidfile.read_text()), signal.SIGKILL)


def run_daemon(site: Site, *extra: str) -> subprocess.CompletedProcess[str]:
    """`dropgate run` in the foreground; it must refuse and exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(site.config_path), "run", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def assert_refused(site: Site, result: subprocess.CompletedProcess[str], *, what: str) -> None:
    assert result.returncode == EXIT_NO_JOURNAL, result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("dropgate: ")]
    assert len(message) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert what in message[0]
    assert "restore journal.db" in message[0] or "restore the journal" in message[0]
    assert "dropgate run --fresh-journal" in message[0]


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_a_lost_journal_beside_evidence_of_runs_stops_the_daemon(used_site: Site, how: str) -> None:
    site = used_site
    journal = site.state / "journal.db"
    # Given the journal deleted (with its write-ahead files) or emptied to 0 bytes
    for suffix in ("-wal", "-shm"):
        journal.with_name("journal.db" + suffix).unlink(missing_ok=True)
    if how == "deleted":
        journal.unlink()
    else:
        journal.write_bytes(b"")
    # When the daemon starts
    result = run_daemon(site)
    # Then it refuses, naming what it found, and leaves the journal as it was
    assert_refused(site, result, what=f"the journal {journal} is {'missing' if how == 'deleted' else 'empty'}")
    for evidence in ("2 spooled archives", "2 run logs", "snapshot", "releases", "dropgate.lock"):
        assert evidence in result.stderr, evidence
    assert journal.exists() == (how == "emptied")
    if how == "emptied":
        assert journal.stat().st_size == 0


def test_read_only_commands_without_a_journal_do_not_say_idle(used_site: Site) -> None:
    site = used_site
    (site.state / "journal.db").unlink()
    for args in (("status", "--json"), ("status",), ("history", "--json"), ("show", "2")):
        result = site.cli(*args)
        assert result.returncode == EXIT_NO_JOURNAL, (args, result.stdout, result.stderr)
        assert "idle" not in result.stdout
        assert "the journal" in result.stderr and "is missing" in result.stderr
        assert "gate's state is unknown" in result.stderr
        assert "spooled archive" in result.stderr


def test_a_fresh_site_starts_normally_and_status_says_to_start_it(site: Site) -> None:
    # Before the daemon ever ran, status cannot know the gate either, and says why
    result = site.cli("status", "--json")
    assert result.returncode == EXIT_NO_JOURNAL
    assert "if dropgate never ran here, start the daemon" in result.stderr
    # A fresh state folder (the adopted release, no runs) starts normally
    site.start_daemon()
    assert site.status()["gate"] == "idle"


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_journal_is_refused_and_never_overwritten(used_site: Site, damage: str) -> None:
    site = used_site
    journal = site.state / "journal.db"
    db = sqlite3.connect(journal)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    for suffix in ("-wal", "-shm"):
        journal.with_name("journal.db" + suffix).unlink(missing_ok=True)
    if damage == "garbage":
        journal.write_bytes(b"this is not a database\n" * 200)
    else:
        data = journal.read_bytes()
        journal.write_bytes(data[: len(data) // 2])
    before = journal.read_bytes()
    result = run_daemon(site)
    assert result.returncode == EXIT_NO_JOURNAL, result.stderr
    assert "Traceback" not in result.stderr
    expected = "is not an SQLite database" if damage == "garbage" else "is damaged"
    assert f"the journal {journal} {expected}" in result.stderr
    assert "It was left exactly as it is" in result.stderr
    assert journal.read_bytes() == before
    status = site.cli("status", "--json")
    assert status.returncode != 0 and "idle" not in status.stdout


def test_starting_afresh_on_purpose_is_recorded_and_sticks(used_site: Site) -> None:
    site = used_site
    journal = site.state / "journal.db"
    journal.unlink()
    stale_wal = journal.with_name("journal.db-wal")
    stale_wal.write_bytes(b"stale")
    # When the operator starts afresh on purpose, with a note
    daemon = site.start_daemon(args=("--fresh-journal", "disk replaced; journal lost, platform checked by hand"))
    # Then the daemon runs with an empty history, the decision recorded with the evidence
    assert site.status()["gate"] == "idle"
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    (message,) = [row[0] for row in db.execute("SELECT message FROM gate_events WHERE kind = 'fresh-journal'")]
    db.close()
    assert "journal started afresh by root" in message
    assert "disk replaced; journal lost, platform checked by hand" in message
    assert "spooled archive" in message
    # the stale write-ahead file of the lost journal was set aside, not applied, not deleted
    assert [p.name.startswith("journal.db-wal.before-fresh-") for p in site.state.iterdir()].count(True) == 1
    daemon.stop()
    # And later starts need no flag
    daemon = site.start_daemon()
    assert site.status()["gate"] == "idle"
    daemon.stop()
    # while --fresh-journal never replaces a journal that exists
    refused = run_daemon(site, "--fresh-journal", "again")
    assert refused.returncode == 2
    assert "is never replaced" in refused.stderr
    assert [p.name.startswith("journal.db.before-fresh-") for p in site.state.iterdir()].count(True) == 0


ALL_READERS = (("status",), ("status", "--json"), ("history",))
CONTENT_DAMAGE = {
    # what was done to the journal: (SQL, what the daemon's one line says, the read-only commands that read it)
    "runs deleted": ("DELETE FROM runs", "holds no runs, but this site shows earlier runs", ALL_READERS),
    "runs table dropped": ("DROP TABLE runs", "is damaged: it has no table runs", ALL_READERS),
    "events table dropped": ("DROP TABLE events", "is damaged: it has no table events", ALL_READERS),
    "facts not JSON": ("UPDATE runs SET facts = '{broken' WHERE id = 2", "run 2 has facts that are not", ALL_READERS),
    "facts a list": ("UPDATE runs SET facts = '[1]' WHERE id = 1", "run 1 has facts that are not", (("history",),)),
    "unknown outcome": ("UPDATE runs SET outcome = 'weird' WHERE id = 2", "run 2 has the outcome 'weird'", ALL_READERS),
    "time not a number": ("UPDATE runs SET started = 'x' WHERE id = 2", "run 2 has started 'x'", ALL_READERS),
    "unknown step": ("UPDATE runs SET step = 'bogus' WHERE id = 1", "run 1 is at the step 'bogus'", ()),
}


@pytest.mark.parametrize("damage", sorted(CONTENT_DAMAGE))
def test_a_journal_whose_contents_were_changed_is_refused_in_one_line_and_never_overwritten(
    used_site: Site, damage: str
) -> None:
    # Given a site whose journal is intact for SQLite but holds what dropgate never writes
    site = used_site
    sql, expected, readers = CONTENT_DAMAGE[damage]
    journal = site.state / "journal.db"
    db = sqlite3.connect(journal)
    db.execute(sql)
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    before = journal.read_bytes()
    # When the daemon starts
    result = run_daemon(site)
    # Then it refuses with exit 5 and one line naming what is wrong, and leaves the journal as it is
    assert result.returncode == EXIT_NO_JOURNAL, result.stderr
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("dropgate: ")]
    assert expected in message, message
    assert "--fresh-journal" in message
    assert journal.read_bytes() == before
    # and the read-only commands that read the damaged part refuse the same way, never saying idle
    for args in ALL_READERS:
        status = site.cli(*args)
        assert "Traceback" not in status.stderr, status.stderr
        if args in readers:
            assert status.returncode == EXIT_NO_JOURNAL, (args, status.stdout, status.stderr)
            assert "idle" not in status.stdout
            assert "is damaged" in status.stderr or "holds no runs" in status.stderr
