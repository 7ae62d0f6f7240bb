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
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import JournalError

OUTCOMES = ("succeeded", "rejected", "failed", "rolled_back", "interrupted")
BLOCKING_OUTCOMES = ("failed", "rolled_back", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id               INTEGER PRIMARY KEY,
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
"""

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
        }


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


_PROGRESS = {"progress", "progress_message"}  # written often, and only for display


class Journal:
    """Thread-safe access to the journal database (one connection, one lock)."""

    def __init__(self, path: Path, *, readonly: bool = False, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self.now = now
        self._lock = threading.RLock()
        try:
            if readonly:
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            raise JournalError(f"cannot open the journal {path}: {error}") from error
        self._db.row_factory = sqlite3.Row

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
    def add_run(self, archive: str, *, spool: Path, arrived: float, retry_of: int | None = None) -> int:
        """Record a new queued run; its archive's place is `spool/<id>/<archive>`."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (archive, path, arrived, retry_of) VALUES (?, '', ?, ?)",
                (archive, arrived, retry_of),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            db.execute("UPDATE runs SET path = ? WHERE id = ?", (str(spool / str(run_id) / archive), run_id))
        return run_id

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
        rows = self._query(
            "SELECT * FROM runs WHERE sha256 = ? AND id != ? AND outcome IS NOT NULL ORDER BY id DESC LIMIT 1",
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

    def last_outcome_times(self) -> dict[str, float]:
        rows = self._query("SELECT outcome, MAX(finished) FROM runs WHERE outcome IS NOT NULL GROUP BY outcome")
        return {row[0]: float(row[1]) for row in rows if row[1] is not None}
