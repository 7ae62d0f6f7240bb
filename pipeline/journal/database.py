"""The journal's file: its schema, the checks before it is opened, its creation, and the connections.

A new journal is built aside and renamed into place; an existing one is checked
(SQLite header, `quick_check`) without being written to. The daemon's
connection is WAL with synchronous FULL; the read-only commands get a read-only
one (immutable when the daemon stopped cleanly and they may not create -shm).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Collection
from pathlib import Path

from pipeline.errors import JournalDamaged, JournalError
from pipeline.journal.records import DamagedRow, row_to_run

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    archive          TEXT NOT NULL,
    path             TEXT NOT NULL,
    sha256           TEXT,
    size             INTEGER,
    from_version     TEXT,
    to_version       TEXT,
    step             TEXT NOT NULL DEFAULT 'queued',
    outcome          TEXT,
    arrived          REAL NOT NULL,
    started          REAL,
    finished         REAL,
    step_started     REAL,
    step_deadline    REAL,
    progress         REAL,
    progress_message TEXT,
    error            TEXT,
    platform_changed INTEGER NOT NULL DEFAULT 0,
    maintenance      INTEGER NOT NULL DEFAULT 0,
    resolved         REAL,
    resolved_note    TEXT,
    retry_of         INTEGER,
    facts            TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,
    run_id  INTEGER NOT NULL REFERENCES runs(id),
    ts      REAL NOT NULL,
    step    TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, id);
CREATE TABLE IF NOT EXISTS step_timings (
    run_id   INTEGER NOT NULL REFERENCES runs(id),
    step     TEXT NOT NULL,
    started  REAL NOT NULL,
    finished REAL NOT NULL,
    result   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS step_timings_run ON step_timings(run_id);
CREATE INDEX IF NOT EXISTS runs_sha ON runs(sha256);
CREATE TABLE IF NOT EXISTS commands (
    token       TEXT PRIMARY KEY,
    run_id      INTEGER,
    label       TEXT NOT NULL,
    command     TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,
    boot_id     TEXT NOT NULL,
    started     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS gate_events (
    id      INTEGER PRIMARY KEY,
    ts      REAL NOT NULL,
    kind    TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_open ON runs(outcome, resolved);
CREATE TABLE IF NOT EXISTS settings (
    id    INTEGER PRIMARY KEY,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    ts    REAL NOT NULL,
    who   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS settings_key ON settings(key, id);
CREATE TABLE IF NOT EXISTS feed_checks (
    id             INTEGER PRIMARY KEY,
    started        REAL NOT NULL,
    finished       REAL,
    result         TEXT,
    message        TEXT,
    sequence       INTEGER,
    digest         TEXT,
    available      TEXT,
    downloading    TEXT,
    total          INTEGER,
    fetched        TEXT,
    fetched_sha256 TEXT,
    notes          TEXT
);
"""

# The tables of the first release: every journal has them (later ones are created when missing).
FIRST_TABLES = ("runs", "events", "step_timings")

# Columns added after the first release: (table, column, declaration), added when missing.
ADDED_COLUMNS = (("runs", "fault", "TEXT"),)

SQLITE_MAGIC = b"SQLite format 3\x00"


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection, also for a user who may not write the state folder (an admin).

    While the daemon runs, its -wal and -shm files exist and a reader only reads
    them. When it stopped cleanly they are gone and SQLite would have to create
    the -shm file to read a WAL database; a reader who may not is given the
    database as immutable, which is exact then: with no -wal file, every
    committed transaction is in the main file.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
    try:
        db.execute("PRAGMA schema_version").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
        if os.path.exists(f"{path}-wal"):
            raise
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False, timeout=10)


def open_readwrite(path: Path) -> sqlite3.Connection:
    """The daemon's connection (WAL, synchronous FULL), on a journal created first if there is none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if check_intact(path) is None:
        create(path)
    db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
    add_missing_columns(db)
    return db


def add_missing_columns(db: sqlite3.Connection) -> None:
    """Bring a journal written by an older dropgate up to the columns of this one."""
    for table, column, declaration in ADDED_COLUMNS:
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in present:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def check_header(path: Path) -> bool:
    """Whether `path` holds something (False: missing or empty); raise JournalDamaged if it is not SQLite."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return False
    except OSError as error:
        raise JournalError(f"cannot read the journal {path}: {error.strerror}") from error
    if not head:
        return False
    if head != SQLITE_MAGIC:
        raise JournalDamaged(f"the journal {path} is not an SQLite database (it starts with {head[:8]!r})")
    return True


def create(path: Path) -> None:
    """A new journal, built aside and renamed into place: a reader never sees it empty or half made."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.new")
    aside.unlink(missing_ok=True)
    db = sqlite3.connect(aside, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
    finally:
        db.close()
    fd = os.open(aside, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(aside, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_intact(path: Path) -> bool | None:
    """Refuse a journal file that is not an intact SQLite database; never write to it.

    None when there is nothing yet (missing or 0 bytes: the daemon decides whether
    that is allowed), True when it is intact. The check reads only: a read-only
    connection neither repairs nor checkpoints.
    """
    if not check_header(path):
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            problems = [str(row[0]) for row in db.execute("PRAGMA quick_check")]
            tables = {str(row[0]) for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error as error:
        raise JournalDamaged(f"the journal {path} is damaged: {error}") from error
    if problems != ["ok"]:
        raise JournalDamaged(f"the journal {path} is damaged: {problems[0]}")
    if tables:  # no table at all is a journal never written: the daemon decides
        check_first_tables(path, tables)
    return True


def check_first_tables(path: Path, tables: set[str]) -> None:
    """Raise JournalDamaged if `tables` (a journal's) lacks one every journal has had since the first release."""
    missing = [table for table in FIRST_TABLES if table not in tables]
    if missing:
        raise JournalDamaged(f"the journal {path} is damaged: it has no table {', '.join(missing)}")


def check_runs(path: Path, steps: Collection[str]) -> None:
    """Refuse a journal whose runs hold values dropgate never writes (changed by hand, or damaged).

    Read once at start-up, before the daemon acts on any run: every row must read
    back as a Run, its step one of `steps`. Rows are read one by one (little memory
    whatever the history's length).
    """
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as error:
        raise JournalDamaged(f"the journal {path} is damaged: {error}") from error
    try:
        db.row_factory = sqlite3.Row
        for row in db.execute("SELECT * FROM runs ORDER BY id"):
            _check_run(row, steps)
    except (DamagedRow, sqlite3.Error) as error:
        raise JournalDamaged(f"the journal {path} is damaged: {error}") from error
    finally:
        db.close()


def _check_run(row: sqlite3.Row, steps: Collection[str]) -> None:
    run = row_to_run(row)
    if run.step not in steps:
        raise DamagedRow(f"run {run.id} is at the step {run.step!r}, which is not a step of dropgate")
