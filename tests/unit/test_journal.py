"""The journal: SQLite in WAL mode with synchronous FULL; the gate is derived from the runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pipeline.journal import Journal


def test_the_journal_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    journal.close()


def test_the_gate_follows_the_runs(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    spool = tmp_path / "spool"
    # Given no runs, the gate is idle
    assert journal.gate() == "idle"
    # A queued run does not make it busy; a started one does
    first = journal.add_run("gts.1.1.tgz", spool=spool, arrived=1.0)
    assert journal.gate() == "idle"
    assert journal.run(first).path == str(spool / str(first) / "gts.1.1.tgz")  # type: ignore[union-attr]
    journal.update_run(first, step="apply")
    assert journal.gate() == "busy"
    # A rejected run does not block; a failed one does until it is resolved
    journal.update_run(first, outcome="rejected")
    assert journal.gate() == "idle"
    second = journal.add_run("gts.1.2.tgz", spool=spool, arrived=2.0)
    journal.update_run(second, step="apply", outcome="failed")
    assert journal.gate() == "blocked"
    journal.update_run(second, resolved=3.0, resolved_note="checked by hand")
    assert journal.gate() == "idle"
    journal.close()


def test_records_survive_reopening_and_a_reader_sees_them(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    run_id = journal.add_run("gts.2.0.tgz", spool=tmp_path, arrived=5.0)
    journal.update_run(run_id, facts={"to_version": "2.0"}, platform_changed=True)
    journal.add_event(run_id, "validate", "signature ok")
    # A read-only reader (the CLI while the daemon runs) sees committed data at once
    reader = Journal(path, readonly=True)
    run = reader.run(run_id)
    assert run is not None and run.facts == {"to_version": "2.0"} and run.platform_changed
    assert [e.message for e in reader.events(run_id)] == ["signature ok"]
    reader.close()
    journal.close()
    # and the read-only reader cannot write
    reader = Journal(path, readonly=True)
    try:
        reader.add_event(run_id, "x", "y")
    except sqlite3.OperationalError as error:
        assert "readonly" in str(error)
    else:
        raise AssertionError("a read-only journal accepted a write")
    finally:
        reader.close()


def test_runs_that_failed_for_the_site_never_make_the_same_bytes_a_repeat(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.db")
    spool = tmp_path / "spool"
    first = journal.add_run("gts.1.1.tgz", spool=spool, arrived=1.0)
    journal.update_run(first, sha256="abc", outcome="rejected", fault="archive")
    second = journal.add_run("gts.1.1.tgz", spool=spool, arrived=2.0)
    journal.update_run(second, sha256="abc", outcome="rejected", fault="site")
    # the site-fault run is skipped: the last judgement of these bytes is run 1's
    assert journal.last_with_sha("abc").id == first  # type: ignore[union-attr]
    assert journal.last_with_sha("def") is None
    third = journal.add_run("gts.1.2.tgz", spool=spool, arrived=3.0)
    journal.update_run(third, sha256="def", outcome="rejected", fault="site")
    assert journal.last_with_sha("def") is None
    assert journal.run(third).to_json()["fault"] == "site"  # type: ignore[union-attr]
    journal.close()


def test_a_journal_from_before_the_fault_column_opens_and_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, archive TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT,"
        " size INTEGER, from_version TEXT, to_version TEXT, step TEXT NOT NULL DEFAULT 'queued', outcome TEXT,"
        " arrived REAL NOT NULL, started REAL, finished REAL, step_started REAL, step_deadline REAL,"
        " progress REAL, progress_message TEXT, error TEXT, platform_changed INTEGER NOT NULL DEFAULT 0,"
        " maintenance INTEGER NOT NULL DEFAULT 0, resolved REAL, resolved_note TEXT, retry_of INTEGER,"
        " facts TEXT NOT NULL DEFAULT '{}');"
        # the other tables of the first release, as it created them
        "CREATE TABLE events (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id),"
        " ts REAL NOT NULL, step TEXT NOT NULL, message TEXT NOT NULL);"
        "CREATE TABLE step_timings (run_id INTEGER NOT NULL REFERENCES runs(id), step TEXT NOT NULL,"
        " started REAL NOT NULL, finished REAL NOT NULL, result TEXT NOT NULL);"
        "INSERT INTO runs (archive, path, sha256, outcome, arrived) VALUES ('gts.1.1.tgz', 'x', 'abc', 'rejected', 1);"
    )
    old.commit()
    old.close()
    journal = Journal(path)
    assert journal.last_with_sha("abc").fault is None  # type: ignore[union-attr]
    journal.close()
    reader = Journal(path, readonly=True)
    assert reader.run(1).archive == "gts.1.1.tgz"  # type: ignore[union-attr]
    reader.close()
