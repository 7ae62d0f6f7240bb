"""`Journal`: thread-safe access to the journal database (one connection, one lock).

Every read and write of runs, events, step timings, the commands running now,
the gate's own events, site settings and feed checks goes through it. A change
of a run's state is a durable transaction (synced before the call returns);
events, timings and progress are committed without waiting for the disk and
synced with the next durable one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.errors import JournalDamaged, JournalError
from pipeline.journal.database import check_first_tables, open_readonly, open_readwrite
from pipeline.journal.records import (
    BLOCKING_OUTCOMES,
    FEED_CHECK_COLUMNS,
    PROGRESS,
    RUN_COLUMNS,
    DamagedRow,
    Event,
    FeedCheck,
    Run,
    Setting,
    row_to_run,
)
from pipeline.sessions import CommandRecord


class Journal:
    """Thread-safe access to the journal database (one connection, one lock)."""

    def __init__(self, path: Path, *, readonly: bool = False, now: Callable[[], float] = time.time) -> None:
        self.path = path
        self.now = now
        self._lock = threading.RLock()
        try:
            self._db = open_readonly(path) if readonly else open_readwrite(path)
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
                if _damaged(error):
                    raise JournalDamaged(f"the journal {self.path} is damaged: {error}") from error
                raise JournalError(f"cannot read the journal {self.path}: {error}") from error

    def check_tables(self) -> None:
        """Raise JournalDamaged if a table every journal has is missing (a reader's cheap check)."""
        tables = {str(row[0]) for row in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        check_first_tables(self.path, tables)

    def _run_of(self, row: sqlite3.Row) -> Run:
        try:
            return row_to_run(row)
        except DamagedRow as error:
            raise JournalDamaged(f"the journal {self.path} is damaged: {error}") from error

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
        unknown = set(fields) - RUN_COLUMNS
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
        unknown = set(fields) - RUN_COLUMNS
        if unknown:
            raise ValueError(f"not a run column: {', '.join(sorted(unknown))}")
        if "facts" in fields:
            fields["facts"] = json.dumps(fields["facts"], sort_keys=True, default=str)
        for key in ("platform_changed", "maintenance"):
            if key in fields:
                fields[key] = int(bool(fields[key]))
        assignments = ", ".join(f"{key} = ?" for key in fields)
        with self._transaction(durable=not set(fields) <= PROGRESS) as db:
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
        return self._run_of(rows[0]) if rows else None

    def runs(self, limit: int = 50) -> list[Run]:
        """Newest first."""
        return [self._run_of(row) for row in self._query("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))]

    def last_run_id(self) -> int:
        """The highest run id committed (0: none yet)."""
        rows = self._query("SELECT MAX(id) AS top FROM runs")
        return int(rows[0]["top"] or 0) if rows else 0

    def queued(self) -> list[Run]:
        """Runs still to do, in arrival order."""
        rows = self._query("SELECT * FROM runs WHERE outcome IS NULL AND step = 'queued' ORDER BY id")
        return [self._run_of(row) for row in rows]

    def unfinished(self) -> list[Run]:
        """Runs that started and have no outcome (at start-up: the daemon died during them)."""
        rows = self._query("SELECT * FROM runs WHERE outcome IS NULL AND step != 'queued' ORDER BY id")
        return [self._run_of(row) for row in rows]

    def blocking(self) -> list[Run]:
        """Runs whose outcome blocks the gate until an operator resolves them."""
        marks = ",".join("?" * len(BLOCKING_OUTCOMES))
        rows = self._query(
            f"SELECT * FROM runs WHERE outcome IN ({marks}) AND resolved IS NULL ORDER BY id",  # noqa: S608
            BLOCKING_OUTCOMES,
        )
        return [self._run_of(row) for row in rows]

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
        return self._run_of(rows[0]) if rows else None

    def last_with_outcome(self, *outcomes: str) -> Run | None:
        marks = ",".join("?" * len(outcomes))
        rows = self._query(
            f"SELECT * FROM runs WHERE outcome IN ({marks}) ORDER BY id DESC LIMIT 1",  # noqa: S608
            outcomes,
        )
        return self._run_of(rows[0]) if rows else None

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
        unknown = set(fields) - FEED_CHECK_COLUMNS
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


def _damaged(error: sqlite3.Error) -> bool:
    """Whether a failed read means the file is damaged (not busy, not unreadable): a missing table or column too."""
    if isinstance(error, sqlite3.OperationalError):
        return str(error).startswith(("no such table", "no such column"))
    return isinstance(error, sqlite3.DatabaseError)
