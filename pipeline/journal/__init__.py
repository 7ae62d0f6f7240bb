"""The journal: SQLite (WAL, synchronous FULL) holding runs, events and step timings.

It is the single source of truth for status and history; the gate is derived
from it, never stored beside it. The daemon opens it read-write; the read-only
commands open it read-only and work while the daemon is down.

Every change of a run's state is synced to disk before the call returns;
events, step timings and progress are committed without waiting for the disk
and synced with the next change of state (a SIGKILL loses none of them; a
power cut at most the last lines of history).

`database` is the file (schema, checks, creation, opening), `records` what it
holds as Python values, `connection` the `Journal` through which every read
and write goes.
"""

from __future__ import annotations

from pipeline.journal.connection import Journal
from pipeline.journal.database import SQLITE_MAGIC, check_header, check_intact, check_runs
from pipeline.journal.records import BLOCKING_OUTCOMES, OUTCOMES, Event, FeedCheck, Run, Setting

__all__ = [
    "BLOCKING_OUTCOMES",
    "OUTCOMES",
    "SQLITE_MAGIC",
    "Event",
    "FeedCheck",
    "Journal",
    "Run",
    "Setting",
    "check_header",
    "check_intact",
    "check_runs",
]
