"""A run rejected in `prereq`, end to end: the real daemon, a real signed archive, the real CLI.

This machine is made too small by configuration (`prereq.min_cpus` above its
core count), not by patching: the daemon reads the real machine with psutil.
"""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from tests.conftest import Site


def usable_cpus() -> int:
    return min(psutil.cpu_count(logical=True) or 1, len(os.sched_getaffinity(0)))


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` with its mode, and for files their size and mtime (a folder's own mtime
    changes when something is added and removed again, which leaves nothing behind)."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        is_dir = path.is_dir() and not path.is_symlink()
        entries[str(path.relative_to(root))] = (
            info.st_mode,
            0 if is_dir else info.st_size,
            0 if is_dir else info.st_mtime_ns,
        )
    return entries


def test_a_run_rejected_in_prereq_changes_nothing_and_runs_again_only_on_retry(site: Site) -> None:
    # Given a daemon configured to need one core more than this machine has
    cores = usable_cpus()
    site.write_config(prereq={"min_cpus": cores + 1, "recommended_cpus": cores + 1})
    archive = site.pack("1.0.1")
    data_before, backups_before = tree(site.data), tree(site.backups)
    live_before = tree(site.platform / "releases" / "1.0.0")
    daemon = site.start_daemon()
    # When the archive is dropped
    site.drop(archive)
    run = site.wait_outcome(1)
    # Then the run is rejected in prereq, the one-line reason naming the cores found and required
    assert run["outcome"] == "rejected"
    assert run["step"] == "prereq"
    assert run["error"] == f"prerequisites not met: cpus: {cores} CPU cores, at least {cores + 1} required"
    assert run["platform_changed"] is False
    # And its history lists every check, notices too
    events = [event["message"] for event in site.show(1)["events"] if event["step"] == "prereq"]
    assert f"critical cpus: {cores} CPU cores, at least {cores + 1} required" in events
    assert "notice health: no health checks configured (verify.http, verify.commands): not checked" in events
    # And nothing on the platform changed: the live release, its data, no backup, no maintenance
    assert os.readlink(site.platform / "current") == "releases/1.0.0"
    assert tree(site.platform / "releases" / "1.0.0") == live_before
    assert tree(site.data) == data_before
    assert tree(site.backups) == backups_before
    assert not (site.root / "run" / "maintenance").exists()
    assert site.status()["gate"] == "idle"  # a rejection does not block the gate

    # When the same bytes are dropped again
    site.drop(archive)
    repeat = site.wait_outcome(2)
    # Then they are refused at once as a repeat, pointing at retry
    assert repeat["outcome"] == "rejected"
    assert "was already rejected as run 1" in repeat["error"]
    assert "dropgate retry 1" in repeat["error"]

    # When the machine is made acceptable (thresholds lowered, daemon restarted) and the operator retries
    daemon.stop()
    site.write_config(prereq={"min_cpus": 1, "recommended_cpus": 1})
    site.start_daemon()
    result = site.cli("retry", "1")
    assert result.returncode == 0, result.stderr
    # Then the archive runs again, as a new run, and this time it goes through
    retried = site.wait_outcome(3, timeout=120)
    assert retried["outcome"] == "succeeded", retried["error"]
    assert retried["retry_of"] == 1
    assert os.readlink(site.platform / "current") == "releases/1.0.1"
    # And nothing else was run again on its own: three runs, the two rejections untouched
    assert [(r["id"], r["outcome"]) for r in site.history()] == [(3, "succeeded"), (2, "rejected"), (1, "rejected")]


def test_a_run_rejected_in_prereq_leaves_no_trace_among_the_releases(site: Site) -> None:
    # Given a daemon configured to need one core more than this machine has
    cores = usable_cpus()
    site.write_config(prereq={"min_cpus": cores + 1, "recommended_cpus": cores + 1})
    archive = site.pack("1.0.1")
    platform_before = tree(site.platform)
    site.start_daemon()
    # When the archive is dropped and rejected in prereq
    site.drop(archive)
    assert site.wait_outcome(1)["outcome"] == "rejected"
    # Then the platform folder is as it was: no release 1.0.1 lying among the releases
    assert tree(site.platform) == platform_before
