"""Every metric of SPEC section 6, defined on a registry that is passed in (nothing at import time).

`Metrics` is an observer of the runner and the inbox; the daemon's main loop
sets the heartbeat. Names are a contract: monitoring and alert rules use them.
prometheus_client adds the suffixes of some types, so three are exported under
longer names than they are declared with: the counter `dropgate_runs` as
`dropgate_runs_total`, the infos `dropgate_platform_version` and `dropgate_build`
as `dropgate_platform_version_info` and `dropgate_build_info` (and the nightly
job's `dropgate_feed_available_version` as `dropgate_feed_available_version_info`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, write_to_textfile

from pipeline import __version__
from pipeline.config import STEPS
from pipeline.journal import OUTCOMES, Journal, Run
from pipeline.observers import Observer

GATE_STATES = ("idle", "busy", "blocked")
STEP_STATES = ("none", *STEPS, "rollback")
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, float("inf"))


class Metrics(Observer):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.gate = Enum(
            "dropgate_gate", "The gate: idle, busy or blocked.", states=list(GATE_STATES), registry=registry
        )
        self.step = Enum(
            "dropgate_step", "The current step of the active run.", states=list(STEP_STATES), registry=registry
        )
        self.step_started_at = Gauge(
            "dropgate_step_started_timestamp_seconds", "When the current step began (0 when none).", registry=registry
        )
        self.step_deadline_at = Gauge(
            "dropgate_step_deadline_timestamp_seconds",
            "When the current step's time limit ends (0 when none or no limit).",
            registry=registry,
        )
        self.progress_ratio = Gauge(
            "dropgate_step_progress_ratio",
            "Progress within the current step, 0..1, where measurable.",
            registry=registry,
        )
        self.step_duration = Histogram(
            "dropgate_step_duration_seconds",
            "Duration of finished steps.",
            ["step"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.runs = Counter("dropgate_runs", "Runs by outcome.", ["outcome"], registry=registry)
        self.last_success = Gauge(
            "dropgate_last_success_timestamp_seconds", "When the last run succeeded (0: never).", registry=registry
        )
        self.last_outcome = Gauge(
            "dropgate_last_outcome_timestamp_seconds",
            "When the last run of each outcome ended.",
            ["outcome"],
            registry=registry,
        )
        self.blocked = Gauge("dropgate_blocked", "1 while the gate is blocked.", registry=registry)
        self.maintenance = Gauge("dropgate_maintenance_active", "1 while maintenance is on.", registry=registry)
        self.last_downtime = Gauge(
            "dropgate_last_downtime_seconds", "Maintenance duration of the last run that had one.", registry=registry
        )
        self.inbox_files = Gauge(
            "dropgate_inbox_files", "Files waiting: in the inbox (uploading or settling) or queued.", registry=registry
        )
        self.inbox_oldest = Gauge(
            "dropgate_inbox_oldest_age_seconds", "Age of the oldest waiting file (0 when none).", registry=registry
        )
        self.inbox_uploading_bytes = Gauge(
            "dropgate_inbox_uploading_bytes",
            "Bytes received so far of an upload in progress.",
            ["file"],
            registry=registry,
        )
        self.inbox_uploading_total = Gauge(
            "dropgate_inbox_uploading_total_bytes",
            "Announced full length of an upload in progress.",
            ["file"],
            registry=registry,
        )
        self.heartbeat = Gauge(
            "dropgate_heartbeat_timestamp_seconds", "The daemon's main loop is alive.", registry=registry
        )
        self.platform_version = Info("dropgate_platform_version", "The installed platform version.", registry=registry)
        self.build = Info("dropgate_build", "The dropgate version.", registry=registry)
        self.backup_bytes = Gauge("dropgate_backup_bytes", "Size of the last snapshot.", registry=registry)
        self.backup_last = Gauge(
            "dropgate_backup_last_timestamp_seconds", "When the last snapshot was taken.", registry=registry
        )
        self.auto_update_enabled = Gauge(
            "dropgate_auto_update_enabled", "1 while automatic updates are switched on.", registry=registry
        )
        self.feed_last_check = Gauge(
            "dropgate_feed_last_check_timestamp_seconds",
            "When the vendor's feed was last checked (0: never).",
            registry=registry,
        )
        self.feed_last_check_success = Gauge(
            "dropgate_feed_last_check_success",
            "1 if the last check of the feed succeeded, 0 if it failed (0 before the first).",
            registry=registry,
        )
        self.feed_available_version = Info(
            "dropgate_feed_available_version",
            "The newest applicable version the feed offers (none: nothing to fetch).",
            registry=registry,
        )
        self.feed_download_bytes = Gauge(
            "dropgate_feed_download_bytes", "Bytes of the archive being fetched so far (0: none).", registry=registry
        )
        self.feed_download_total = Gauge(
            "dropgate_feed_download_total_bytes",
            "Full length of the archive being fetched (0: none).",
            registry=registry,
        )
        self.window_next_open = Gauge(
            "dropgate_window_next_open_timestamp_seconds",
            "When the next maintenance window opens (0 when one is open or none is configured).",
            registry=registry,
        )
        self.feed_available_version.info({"version": "none"})
        self.build.info({"version": __version__})
        for outcome in OUTCOMES:
            self.runs.labels(outcome=outcome)
        self.step.state("none")
        self._uploading: set[str] = set()

    # -- start-up: what the journal already knows -----------------------------
    def load(self, journal: Journal, installed_version: str | None) -> None:
        times = journal.last_outcome_times()
        for outcome, when in times.items():
            self.last_outcome.labels(outcome=outcome).set(when)
        self.last_success.set(times.get("succeeded", 0.0))
        self.gate_changed(journal.gate())
        self.set_platform_version(installed_version)
        for run in journal.runs(limit=50):
            if run.facts.get("downtime_seconds") is not None:
                self.last_downtime.set(float(run.facts["downtime_seconds"]))
                break
        for run in journal.runs(limit=50):
            if run.facts.get("backup_bytes") is not None:
                self.backup_bytes.set(float(run.facts["backup_bytes"]))
                self.backup_last.set(float(run.facts.get("backup_at") or 0.0))
                break
        current = journal.unfinished()
        self.maintenance.set(1 if any(run.maintenance for run in journal.runs(limit=20)) else 0)
        if current:
            self.step.state(current[0].step if current[0].step in STEP_STATES else "none")

    def set_platform_version(self, version: str | None) -> None:
        self.platform_version.info({"version": version or "none"})

    # -- the nightly job ------------------------------------------------------------
    def feed_changed(self, *, enabled: bool, last_check: float, success: bool, available: str | None) -> None:
        self.auto_update_enabled.set(1 if enabled else 0)
        self.feed_last_check.set(last_check)
        self.feed_last_check_success.set(1 if success else 0)
        self.feed_available_version.info({"version": available or "none"})

    def download_progress(self, done: int, total: int) -> None:
        self.feed_download_bytes.set(done)
        self.feed_download_total.set(total)

    # -- observer hooks ----------------------------------------------------------
    def gate_changed(self, gate: str) -> None:
        self.gate.state(gate)
        self.blocked.set(1 if gate == "blocked" else 0)

    def step_started(self, run: Run, step: str, started: float, deadline: float | None) -> None:
        # The gate is not set here: it follows gate_changed alone, which the runner calls on every change.
        self.step.state(step)
        self.step_started_at.set(started)
        self.step_deadline_at.set(deadline or 0.0)
        self.progress_ratio.set(0.0)

    def step_finished(self, run: Run, step: str, result: str, seconds: float) -> None:
        self.step_duration.labels(step=step).observe(seconds)
        self.step.state("none")
        self.step_started_at.set(0.0)
        self.step_deadline_at.set(0.0)
        self.progress_ratio.set(0.0)
        self.run_updated(run)

    def step_progress(self, run_id: int, step: str, ratio: float, message: str | None) -> None:
        self.progress_ratio.set(ratio)

    def run_updated(self, run: Run) -> None:
        self.maintenance.set(1 if run.maintenance else 0)
        if run.facts.get("downtime_seconds") is not None:
            self.last_downtime.set(float(run.facts["downtime_seconds"]))
        if run.facts.get("backup_bytes") is not None:
            self.backup_bytes.set(float(run.facts["backup_bytes"]))
            self.backup_last.set(float(run.facts.get("backup_at") or 0.0))

    def run_finished(self, run: Run) -> None:
        if run.outcome is None:
            return
        self.runs.labels(outcome=run.outcome).inc()
        when = run.finished or 0.0
        self.last_outcome.labels(outcome=run.outcome).set(when)
        if run.outcome == "succeeded":
            self.last_success.set(when)
        if run.step != "queued":  # one refused at the inbox never ran: it says nothing of maintenance
            self.run_updated(run)

    def inbox_changed(self, files: int, oldest_age: float, uploading: Sequence[dict[str, Any]]) -> None:
        self.inbox_files.set(files)
        self.inbox_oldest.set(oldest_age)
        names = {upload["name"] for upload in uploading}
        for gone in self._uploading - names:
            self.inbox_uploading_bytes.remove(gone)
            self.inbox_uploading_total.remove(gone)
        for upload in uploading:
            self.inbox_uploading_bytes.labels(file=upload["name"]).set(upload["bytes"])
            self.inbox_uploading_total.labels(file=upload["name"]).set(upload["total"])
        self._uploading = names


def write_textfile(registry: CollectorRegistry, path: Path) -> None:
    """Write the metrics for node_exporter's textfile collector, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_to_textfile(tmp, registry)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
