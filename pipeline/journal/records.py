"""What the journal holds, as Python values: runs, events, settings, feed checks, and their columns."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import dataclass, field
from typing import Any

OUTCOMES = ("succeeded", "rejected", "failed", "rolled_back", "interrupted")
BLOCKING_OUTCOMES = ("failed", "rolled_back", "interrupted")

# The run columns a write may set.
RUN_COLUMNS = {
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
PROGRESS = {"progress", "progress_message"}  # written often, and only for display


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


FEED_CHECK_COLUMNS = frozenset(FeedCheck.__dataclass_fields__) - {"id", "started"}


@dataclass(frozen=True)
class Event:
    run_id: int
    ts: float
    step: str
    message: str


class DamagedRow(ValueError):
    """A row that SQLite reads back intact but no dropgate wrote: the journal was changed by hand or damaged."""


def row_to_run(row: sqlite3.Row) -> Run:
    """A `runs` row as a Run; DamagedRow (saying what is wrong) if its values are not ones dropgate writes."""
    values = dict(row)
    run_id = values.get("id")
    try:
        facts = json.loads(values["facts"] or "{}")
    except (ValueError, TypeError):
        facts = None
    if not isinstance(facts, dict):
        raise DamagedRow(f"run {run_id} has facts that are not a JSON object ({_shown(values['facts'])})")
    if values["outcome"] not in (None, *OUTCOMES):
        known = ", ".join(OUTCOMES)
        raise DamagedRow(f"run {run_id} has the outcome {_shown(values['outcome'])}, which is none of {known}")
    for column in ("arrived", "started", "finished", "step_started", "step_deadline", "progress"):
        value = values[column]
        if value is not None and (isinstance(value, (str, bytes)) or not math.isfinite(value)):
            raise DamagedRow(f"run {run_id} has {column} {_shown(value)}, which is not a finite number")
    if not isinstance(values["archive"], str) or not isinstance(values["step"], str):
        raise DamagedRow(f"run {run_id} has no archive name or no step")
    values["facts"] = facts
    values["platform_changed"] = bool(values["platform_changed"])
    values["maintenance"] = bool(values["maintenance"])
    return Run(**values)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "…"
