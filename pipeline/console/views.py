"""What the console's pages show, read from the journal, the run logs, the backups and `preflight`.

Everything here is read-only and blocking (run it in a worker thread). The
review of a run (the `preflight ARCHIVE` preview of its spooled archive) costs
a pass over the archive, so it is computed once per run and kept.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.journal import Journal, Run
from pipeline.report import JOURNAL_NAME, describe_change, run_view
from pipeline.runlog import tail

LOG_LINES = 200
HISTORY = 100


@contextlib.contextmanager
def reader(config: Config) -> Iterator[Journal | None]:
    """The journal, read-only (None before the first run was ever recorded)."""
    path = config.paths.state / JOURNAL_NAME
    if not path.exists():
        yield None
        return
    journal = Journal(path, readonly=True)
    try:
        yield journal
    finally:
        journal.close()


def actions_for(run: Run, config: Config) -> list[str]:
    """The operator actions that make sense for `run` now (the daemon has the last word)."""
    actions = []
    if run.outcome is None and run.step == "approval":
        actions += ["approve", "reject"]
    elif run.outcome is None and run.step == "window":
        actions.append("reject")
    if run.outcome in ("rejected", "failed", "rolled_back", "interrupted"):
        actions.append("retry")
    if run.outcome in ("failed", "interrupted", "succeeded") and run.platform_changed:
        actions.append("rollback")
    if run.blocking:
        actions.append("resolve")
    return actions


def run_page(config: Config, run_id: int) -> dict[str, Any] | None:
    """One run: its view, step timings, events (the audit trail) and the tail of its log."""
    with reader(config) as journal:
        run = journal.run(run_id) if journal is not None else None
        if journal is None or run is None:
            return None
        view = run_view(run)
        view["events"] = [{"ts": e.ts, "step": e.step, "message": e.message} for e in journal.events(run_id)]
        view["steps"] = journal.step_timings(run_id)
    view["facts"] = run.facts
    view["notes"] = (run.facts.get("manifest") or {}).get("notes")
    view["channel"] = (run.facts.get("manifest") or {}).get("channel")
    view["log_tail"] = tail(config.paths.state / "runs" / f"{run_id}.log", LOG_LINES)
    view["actions"] = actions_for(run, config)
    view["platform"] = describe_change(run)
    return view


def history(config: Config) -> list[dict[str, Any]]:
    with reader(config) as journal:
        return [run_view(run) for run in journal.runs(limit=HISTORY)] if journal is not None else []


def waiting_for_approval(config: Config) -> list[dict[str, Any]]:
    """Runs waiting in approval whose channel this site accepts (unstable only where policy.channels says)."""
    with reader(config) as journal:
        runs = journal.unfinished() if journal is not None else []
    allowed = set(config.policy.channels)
    return [
        run_view(run)
        for run in runs
        if run.step == "approval" and (run.facts.get("manifest") or {}).get("channel", "stable") in allowed
    ]


def last_run_id(config: Config) -> int:
    with reader(config) as journal:
        runs = journal.runs(limit=1) if journal is not None else []
    return runs[0].id if runs else 0


def run_of_upload(config: Config, sha256: str, after: int) -> dict[str, Any] | None:
    """The run that took the uploaded bytes (the newest with that SHA-256 after run `after`)."""
    with reader(config) as journal:
        if journal is None:
            return None
        for run in journal.runs(limit=200):
            if run.id <= after:
                break
            if run.sha256 == sha256:
                return run_view(run)
    return None


def verdict(run: dict[str, Any]) -> tuple[str, str]:
    """(kind, sentence): what the upload's run says about the archive so far."""
    if run["outcome"] == "rejected":
        return "bad", f"Refused: {run['error']}"
    if run["outcome"] is not None:
        return ("good" if run["outcome"] == "succeeded" else "bad"), f"Run {run['id']} ended {run['outcome']}."
    if run["step"] in ("queued", "validate"):
        return "wait", f"Run {run['id']} is checking the archive ({run['step']})."
    return "good", f"The archive is authentic and complete; run {run['id']} is in {run['step']}."


def backups(config: Config) -> list[dict[str, Any]]:
    from pipeline.snapshot import list_snapshots

    return [info.as_dict() for info in reversed(list_snapshots(config.paths.backups))]


def server_check(config: Config) -> dict[str, Any]:
    """The `preflight` report without an archive."""
    from pipeline.preflight import build_report

    return build_report(config).to_dict()


@dataclass
class _Review:
    sha256: str | None
    report: dict[str, Any] | None = None
    error: str | None = None
    made: float = 0.0


class Reviews:
    """`preflight ARCHIVE` of runs waiting in approval, computed once per run (and per archive bytes)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._busy: dict[int, threading.Lock] = {}
        self._done: dict[int, _Review] = {}

    def get(self, run: dict[str, Any]) -> _Review:
        run_id = int(run["id"])
        with self._lock:
            done = self._done.get(run_id)
            if done is not None and done.sha256 == run["sha256"]:
                return done
            busy = self._busy.setdefault(run_id, threading.Lock())
        with busy:  # one computation per run; others wait for it
            with self._lock:
                done = self._done.get(run_id)
                if done is not None and done.sha256 == run["sha256"]:
                    return done
            review = self._compute(run)
            with self._lock:
                self._done[run_id] = review
                while len(self._done) > 20:
                    del self._done[min(self._done)]
            return review

    def _compute(self, run: dict[str, Any]) -> _Review:
        from pipeline.errors import DropgateError
        from pipeline.preflight import build_report

        archive = Path(run["path"])
        review = _Review(sha256=run["sha256"], made=time.time())
        if not archive.is_file():
            review.error = f"the archive of run {run['id']} is no longer at {archive}"
            return review
        try:
            review.report = build_report(self.config, archive).to_dict()
        except DropgateError as error:
            review.error = str(error)
        return review
