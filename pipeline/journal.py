"""The journal: SQLite (WAL, synchronous FULL) holding runs, events and step timings.

It is the single source of truth for status and history; the gate is derived
from it, never stored beside it. The daemon opens it read-write; the read-only
commands open it read-only and work while the daemon is down.

Every change of a run's state is synced to disk before the call returns;
events, step timings and progress are committed without waiting for the disk
and synced with the next change of state (a SIGKILL loses none of them; a
power cut at most the last lines of history).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import JournalDamaged, JournalError
from pipeline.sessions import CommandRecord

OUTCOMES = ("succeeded", "rejected", "failed", "rolled_back", "interrupted")
BLOCKING_OUTCOMES = ("failed", "rolled_back", "interrupted")

_SCHEMA = """
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

# Columns added after the first release: (table, column, declaration), added when missing.
_ADDED_COLUMNS = (("runs", "fault", "TEXT"),)

SQLITE_MAGIC = b"SQLite format 3\x00"

_UPDATABLE = {
    "path",
    "sha256",
    "size",
    "from_version",
    "to_version",
    "step",
    "outcome",
    "started",
    "finished",
    "step_started",
    "step_deadline",
    "progress",
    "progress_message",
    "error",
    "platform_changed",
    "maintenance",
    "resolved",
    "resolved_note",
    "facts",
    "fault",
}


@dataclass
class Run:
    """One archive's way through the steps, as the journal holds it."""

    id: int
    archive: str
    path: str
    sha256: str | None
    size: int | None
    from_version: str | None
    to_version: str | None
    step: str
    outcome: str | None
    arrived: float
    started: float | None
    finished: float | None
    step_started: float | None
    step_deadline: float | None
    progress: float | None
    progress_message: str | None
    error: str | None
    platform_changed: bool
    maintenance: bool
    resolved: float | None
    resolved_note: str | None
    retry_of: int | None
    fault: str | None = None  # of a rejection: "archive" (the bytes), "site" (no space, permission, key file), "name"
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Started and without an outcome."""
        return self.outcome is None and self.step != "queued"

    @property
    def blocking(self) -> bool:
        return self.outcome in BLOCKING_OUTCOMES and self.resolved is None

    def to_json(self) -> dict[str, Any]:
        """The run as `status --json` and `history --json` print it (SPEC section 7)."""
        return {
            "id": self.id,
            "archive": self.archive,
            "sha256": self.sha256,
            "size": self.size,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "step": self.step,
            "outcome": self.outcome,
            "arrived": self.arrived,
            "started": self.started,
            "finished": self.finished,
            "step_started": self.step_started,
            "step_deadline": self.step_deadline,
            "progress": self.progress,
            "progress_message": self.progress_message,
            "error": self.error,
            "platform_changed": self.platform_changed,
            "maintenance": self.maintenance,
            "downtime": self.facts.get("downtime"),
            "downtime_reason": self.facts.get("downtime_reason"),
            "resolved": self.resolved,
            "resolved_note": self.resolved_note,
            "retry_of": self.retry_of,
            "path": self.path,
            "fault": self.fault,
        }


@dataclass(frozen=True)
class Setting:
    """The latest value of a site setting changed by an operator, with who changed it and when."""

    key: str
    value: Any
    ts: float
    who: str


@dataclass(frozen=True)
class FeedCheck:
    """One check of the vendor's feed: `result` is ok, failed, stopped, or None while it runs."""

    id: int
    started: float
    finished: float | None
    result: str | None
    message: str | None
    sequence: int | None
    digest: str | None
    available: str | None
    downloading: str | None
    total: int | None
    fetched: str | None
    fetched_sha256: str | None
    notes: str | None


_FEED_CHECK_COLUMNS = frozenset(FeedCheck.__dataclass_fields__) - {"id", "started"}


@dataclass(frozen=True)
class Event:
    run_id: int
    ts: float
    step: str
    message: str


def _row_to_run(row: sqlite3.Row) -> Run:
    values = dict(row)
    values["platform_changed"] = bool(values["platform_changed"])
    values["maintenance"] = bool(values["maintenance"])
    values["facts"] = json.loads(values["facts"] or "{}")
    return Run(**values)


def _open_readonly(path: Path) -> sqlite3.Connection:
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
_PROGRESS = {"progress", "progress_message"}  # written often, and only for display


class Journal:
    """Thread-safe access to the journal database (one connection, one lock)."""

    def __init__(self, path: Path, *, readonly: bool = False, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self.now = now
        self._lock = threading.RLock()
        try:
            if readonly:
                self._db = _open_readonly(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                if check_intact(path) is None:
                    _create(path)
                self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
                self._add_missing_columns()
        except sqlite3.Error as error:
            raise JournalError(f"cannot open the journal {path}: {error}") from error
        self._db.row_factory = sqlite3.Row

    def _add_missing_columns(self) -> None:
        for table, column, declaration in _ADDED_COLUMNS:
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction. Not `durable`: committed without waiting for the disk (history and progress
        lines, which the next durable commit syncs with it; a SIGKILL loses neither)."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return list(self._db.execute(sql, args))
            except sqlite3.Error as error:
                raise JournalError(f"cannot read the journal {self.path}: {error}") from error

    # -- writes ----------------------------------------------------------
    def add_run(
        self,
        archive: str,
        *,
        spool: Path,
        arrived: float,
        retry_of: int | None = None,
        place: Callable[[int], Path] | None = None,
        **fields: Any,
    ) -> int:
        """Record a new queued run; its archive's place is `spool/<id>/<archive>`.

        `fields` (run columns: sha256, size, or an outcome for a file refused at
        once) are set in the same transaction, so no one sees the run without
        them. `place(id)` runs inside it too, before the run is visible: it puts
        the archive where it belongs and returns that path (a run never exists
        without its file; a crash before the commit leaves the file and no run).
        """
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not a run column: {', '.join(sorted(unknown))}")
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (archive, path, arrived, retry_of) VALUES (?, '', ?, ?)",
                (archive, arrived, retry_of),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            path = place(run_id) if place is not None else spool / str(run_id) / archive
            fields = {**fields, "path": str(path)}
            assignments = ", ".join(f"{key} = ?" for key in fields)
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))  # noqa: S608
        return run_id

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Keep the other threads of this process out of the journal for a few writes in a row
        (the inbox adds the runs it took together at once, so the runner sees all of them or none)."""
        with self._lock:
            yield

    def update_run(self, run_id: int, **fields: Any) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not a run column: {', '.join(sorted(unknown))}")
        if "facts" in fields:
            fields["facts"] = json.dumps(fields["facts"], sort_keys=True, default=str)
        for key in ("platform_changed", "maintenance"):
            if key in fields:
                fields[key] = int(bool(fields[key]))
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._transaction(durable=not set(fields) <= _PROGRESS) as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*fields.values(), run_id))  # noqa: S608

    def add_event(self, run_id: int, step: str, message: str) -> None:
        with self._transaction(durable=False) as db:
            db.execute(
                "INSERT INTO events (run_id, ts, step, message) VALUES (?, ?, ?, ?)",
                (run_id, self.now(), step, message),
            )

    def add_step_timing(self, run_id: int, step: str, started: float, finished: float, result: str) -> None:
        with self._transaction(durable=False) as db:
            db.execute(
                "INSERT INTO step_timings (run_id, step, started, finished, result) VALUES (?, ?, ?, ?, ?)",
                (run_id, step, started, finished, result),
            )

    # -- reads -----------------------------------------------------------
    def run(self, run_id: int) -> Run | None:
        rows = self._query("SELECT * FROM runs WHERE id = ?", (run_id,))
        return _row_to_run(rows[0]) if rows else None

    def runs(self, limit: int = 50) -> list[Run]:
        """Newest first."""
        return [_row_to_run(row) for row in self._query("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))]

    def queued(self) -> list[Run]:
        """Runs still to do, in arrival order."""
        rows = self._query("SELECT * FROM runs WHERE outcome IS NULL AND step = 'queued' ORDER BY id")
        return [_row_to_run(row) for row in rows]

    def unfinished(self) -> list[Run]:
        """Runs that started and have no outcome (at start-up: the daemon died during them)."""
        rows = self._query("SELECT * FROM runs WHERE outcome IS NULL AND step != 'queued' ORDER BY id")
        return [_row_to_run(row) for row in rows]

    def blocking(self) -> list[Run]:
        """Runs whose outcome blocks the gate until an operator resolves them."""
        marks = ",".join("?" * len(BLOCKING_OUTCOMES))
        rows = self._query(
            f"SELECT * FROM runs WHERE outcome IN ({marks}) AND resolved IS NULL ORDER BY id",  # noqa: S608
            BLOCKING_OUTCOMES,
        )
        return [_row_to_run(row) for row in rows]

    def gate(self) -> str:
        """`blocked`, `busy` or `idle`, derived from the runs."""
        if self.blocking():
            return "blocked"
        if self.unfinished():
            return "busy"
        return "idle"

    def last_with_sha(self, sha256: str, *, exclude: int | None = None) -> Run | None:
        """The latest finished run of these bytes that judged them: the one place of the repeat rule.

        Runs that failed because of the site (no space, permission, a key file) or of
        the file's name (`ArchiveMisnamed`) did not judge the bytes, so they never make
        the same bytes a refused repeat.
        """
        rows = self._query(
            "SELECT * FROM runs WHERE sha256 = ? AND id != ? AND outcome IS NOT NULL"
            " AND (fault IS NULL OR fault NOT IN ('site', 'name')) ORDER BY id DESC LIMIT 1",
            (sha256, exclude if exclude is not None else -1),
        )
        return _row_to_run(rows[0]) if rows else None

    def last_with_outcome(self, *outcomes: str) -> Run | None:
        marks = ",".join("?" * len(outcomes))
        rows = self._query(
            f"SELECT * FROM runs WHERE outcome IN ({marks}) ORDER BY id DESC LIMIT 1",  # noqa: S608
            outcomes,
        )
        return _row_to_run(rows[0]) if rows else None

    def events(self, run_id: int) -> list[Event]:
        rows = self._query("SELECT run_id, ts, step, message FROM events WHERE run_id = ? ORDER BY id", (run_id,))
        return [Event(**dict(row)) for row in rows]

    def step_timings(self, run_id: int) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT step, started, finished, result FROM step_timings WHERE run_id = ? ORDER BY started", (run_id,)
        )
        return [dict(row) for row in rows]

    # -- commands running (what finds them after the daemon's death) ----
    def command_started(self, record: CommandRecord) -> None:
        """Record a command before it runs (durable: synchronous FULL)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO commands (token, run_id, label, command, pid, start_ticks, boot_id, started)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.token,
                    record.run_id,
                    record.label,
                    record.command,
                    record.pid,
                    record.start_ticks,
                    record.boot_id,
                    record.started,
                ),
            )

    def command_ended(self, token: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM commands WHERE token = ?", (token,))

    def commands(self) -> list[CommandRecord]:
        """Commands recorded as running: at start-up, those an earlier daemon left."""
        rows = self._query(
            "SELECT token, label, command, pid, start_ticks, boot_id, started, run_id FROM commands ORDER BY started"
        )
        return [CommandRecord(**dict(row)) for row in rows]

    # -- the gate's own history (not of one run) -------------------------
    def add_gate_event(self, kind: str, message: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT INTO gate_events (ts, kind, message) VALUES (?, ?, ?)", (self.now(), kind, message))

    def continue_ids_after(self, last: int) -> None:
        """Number the next runs after `last`, so that they never share a spool folder, a log or a
        snapshot with runs of a lost journal (journals made since ids are AUTOINCREMENT)."""
        with self._transaction() as db:
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'runs'").fetchone()
            if seq is None:
                db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('runs', ?)", (last,))
            elif seq[0] < last:
                db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'runs'", (last,))

    def gate_events(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = self._query(
            "SELECT ts, kind, message FROM gate_events WHERE ? IS NULL OR kind = ? ORDER BY id", (kind, kind)
        )
        return [dict(row) for row in rows]

    def last_outcome_times(self) -> dict[str, float]:
        rows = self._query("SELECT outcome, MAX(finished) FROM runs WHERE outcome IS NOT NULL GROUP BY outcome")
        return {row[0]: float(row[1]) for row in rows if row[1] is not None}

    # -- site settings and feed checks (the nightly job) ------------------------
    def _query_new_table(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """A read of a table a journal written by an older dropgate may not have yet: none means no rows."""
        try:
            return self._query(sql, args)
        except JournalError as error:
            if "no such table" in str(error):
                return []
            raise

    def set_setting(self, key: str, value: Any, who: str, *, ts: float | None = None) -> None:
        """Record an operator's setting (kept as a history: the latest row per key is the value)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO settings (key, value, ts, who) VALUES (?, ?, ?, ?)",
                (key, json.dumps(value), self.now() if ts is None else ts, who),
            )

    def setting(self, key: str) -> Setting | None:
        rows = self._query_new_table(
            "SELECT key, value, ts, who FROM settings WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)
        )
        if not rows:
            return None
        row = rows[0]
        return Setting(row["key"], json.loads(row["value"]), float(row["ts"]), row["who"])

    def start_feed_check(self, started: float) -> int:
        with self._transaction() as db:
            cursor = db.execute("INSERT INTO feed_checks (started) VALUES (?)", (started,))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def update_feed_check(self, check_id: int, **fields: Any) -> None:
        unknown = set(fields) - _FEED_CHECK_COLUMNS
        if unknown:
            raise ValueError(f"not a feed check column: {', '.join(sorted(unknown))}")
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._transaction() as db:
            db.execute(f"UPDATE feed_checks SET {assignments} WHERE id = ?", (*fields.values(), check_id))  # noqa: S608

    def feed_checks(self, limit: int = 20) -> list[FeedCheck]:
        """Newest first."""
        rows = self._query_new_table("SELECT * FROM feed_checks ORDER BY id DESC LIMIT ?", (limit,))
        return [FeedCheck(**dict(row)) for row in rows]

    def last_feed_check(self, *results: str) -> FeedCheck | None:
        """The newest check, or the newest with one of `results`."""
        if not results:
            checks = self.feed_checks(limit=1)
            return checks[0] if checks else None
        marks = ",".join("?" * len(results))
        rows = self._query_new_table(
            f"SELECT * FROM feed_checks WHERE result IN ({marks}) ORDER BY id DESC LIMIT 1",  # noqa: S608
            results,
        )
        return FeedCheck(**dict(rows[0])) if rows else None

    def feed_seen(self) -> tuple[int, str] | None:
        """The highest feed sequence accepted here, with its document's digest (the rollback guard)."""
        rows = self._query_new_table(
            "SELECT sequence, digest FROM feed_checks WHERE sequence IS NOT NULL "
            "ORDER BY sequence DESC, id DESC LIMIT 1"
        )
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    def fetched_notes(self, sha256: str) -> str | None:
        """The release notes the feed gave for an archive fetched with these bytes."""
        rows = self._query_new_table(
            "SELECT notes FROM feed_checks WHERE fetched_sha256 = ? ORDER BY id DESC LIMIT 1", (sha256,)
        )
        return rows[0][0] if rows else None


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


def _create(path: Path) -> None:
    """A new journal, built aside and renamed into place: a reader never sees it empty or half made."""
    aside = path.with_name(f".{path.name}.{os.getpid()}.new")
    aside.unlink(missing_ok=True)
    db = sqlite3.connect(aside, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
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
        finally:
            db.close()
    except sqlite3.Error as error:
        raise JournalDamaged(f"the journal {path} is damaged: {error}") from error
    if problems != ["ok"]:
        raise JournalDamaged(f"the journal {path} is damaged: {problems[0]}")
    return True
