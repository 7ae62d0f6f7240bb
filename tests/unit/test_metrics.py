"""Metrics: the names of SPEC section 6 on a registry passed in, driven through the observer hooks."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from pipeline.journal import Journal
from pipeline.metrics import Metrics, write_textfile


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_run_moves_gate_step_and_outcome_metrics(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    journal = Journal(tmp_path / "journal.db")
    run_id = journal.add_run("gts.1.1.tgz", spool=tmp_path, arrived=1.0)
    journal.update_run(run_id, step="backup")
    run = journal.run(run_id)
    assert run is not None
    # Given a step that starts with a time limit (the runner publishes the gate it derives from the journal)
    metrics.gate_changed(journal.gate())
    metrics.step_started(run, "backup", 100.0, 160.0)
    assert value(registry, "dropgate_step", dropgate_step="backup") == 1.0
    assert value(registry, "dropgate_gate", dropgate_gate="busy") == 1.0
    assert value(registry, "dropgate_step_started_timestamp_seconds") == 100.0
    assert value(registry, "dropgate_step_deadline_timestamp_seconds") == 160.0
    metrics.step_progress(run_id, "backup", 0.25, None)
    assert value(registry, "dropgate_step_progress_ratio") == 0.25
    # When it finishes and the run fails
    metrics.step_finished(run, "backup", "failed", 12.0)
    journal.update_run(run_id, outcome="failed", finished=200.0)
    metrics.run_finished(journal.run(run_id))  # type: ignore[arg-type]
    metrics.gate_changed(journal.gate())
    # Then the step is none again, the duration recorded, the outcome counted, the gate blocked
    assert value(registry, "dropgate_step", dropgate_step="none") == 1.0
    assert value(registry, "dropgate_step_started_timestamp_seconds") == 0.0
    assert value(registry, "dropgate_step_duration_seconds_count", step="backup") == 1.0
    assert value(registry, "dropgate_runs_total", outcome="failed") == 1.0
    assert value(registry, "dropgate_last_outcome_timestamp_seconds", outcome="failed") == 200.0
    assert value(registry, "dropgate_blocked") == 1.0
    assert value(registry, "dropgate_gate", dropgate_gate="blocked") == 1.0
    journal.close()


def test_the_inbox_backlog_and_uploads_are_exported(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.inbox_changed(3, 42.0, [{"name": "gts.2.0.tgz", "bytes": 10, "total": 100}])
    assert value(registry, "dropgate_inbox_files") == 3.0
    assert value(registry, "dropgate_inbox_oldest_age_seconds") == 42.0
    assert value(registry, "dropgate_inbox_uploading_bytes", file="gts.2.0.tgz") == 10.0
    metrics.inbox_changed(0, 0.0, [])
    assert value(registry, "dropgate_inbox_uploading_bytes", file="gts.2.0.tgz") is None


def test_the_textfile_is_written_atomically_for_node_exporter(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Metrics(registry).heartbeat.set(123.0)
    target = tmp_path / "textfile" / "dropgate.prom"
    write_textfile(registry, target)
    assert "dropgate_heartbeat_timestamp_seconds 123.0" in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["dropgate.prom"]


def test_the_nightly_job_and_the_windows_are_exported() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    # Before anything is known: off, never checked, nothing offered, no window
    assert value(registry, "dropgate_auto_update_enabled") == 0.0
    assert value(registry, "dropgate_feed_last_check_timestamp_seconds") == 0.0
    assert value(registry, "dropgate_feed_available_version_info", version="none") == 1.0
    assert value(registry, "dropgate_window_next_open_timestamp_seconds") == 0.0
    # A check that found 3.19.274, during its download
    metrics.feed_changed(enabled=True, last_check=1000.0, success=True, available="3.19.274")
    metrics.download_progress(512, 2048)
    assert value(registry, "dropgate_auto_update_enabled") == 1.0
    assert value(registry, "dropgate_feed_last_check_timestamp_seconds") == 1000.0
    assert value(registry, "dropgate_feed_last_check_success") == 1.0
    assert value(registry, "dropgate_feed_available_version_info", version="3.19.274") == 1.0
    assert value(registry, "dropgate_feed_available_version_info", version="none") is None
    assert (value(registry, "dropgate_feed_download_bytes"), value(registry, "dropgate_feed_download_total_bytes")) == (
        512.0, 2048.0)
    # A failed check, switched off
    metrics.feed_changed(enabled=False, last_check=2000.0, success=False, available=None)
    assert value(registry, "dropgate_feed_last_check_success") == 0.0
    assert value(registry, "dropgate_auto_update_enabled") == 0.0
    assert value(registry, "dropgate_feed_available_version_info", version="none") == 1.0
