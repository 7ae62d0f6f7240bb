"""The preflight report's parts: the release comparison, the table, a small full machine.

Release folders are real files under tmp_path; the machine is an injected probe
(see tests/unit/test_prereq.py), since a 2-core, 4 GiB, 95 %-full machine cannot
be had here otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.preflight import build_report, compare_release, describe_runner, render, render_checks
from pipeline.probes import DiskUsage
from states.prereq import GIB, Check
from tests.unit.test_prereq import Machine, make_site


def entry(text: str, mode: str = "0644") -> dict[str, Any]:
    data = text.encode()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mode": mode}


def test_compare_release_sorts_files_into_added_changed_removed(tmp_path: Path) -> None:
    # Given a current release and a manifest of the next one
    current = tmp_path / "1.0.0"
    (current / "lib").mkdir(parents=True)
    (current / "same.txt").write_text("same\n")
    (current / "same-size.txt").write_text("aaaa\n")
    (current / "longer.txt").write_text("short\n")
    (current / "lib" / "gone.py").write_text("x = 1\n")
    (current / "tool.sh").write_text("#!/bin/sh\n")
    for path in current.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    files = {
        "same.txt": entry("same\n"),
        "same-size.txt": entry("bbbb\n"),  # same size, other content: found by its hash
        "longer.txt": entry("much longer now\n"),
        "tool.sh": entry("#!/bin/sh\n", "0755"),  # same content, now executable
        "lib/new.py": entry("y = 2\n"),
    }
    # When they are compared
    changes = compare_release(current, files)
    # Then each file is where an operator expects it
    assert [(c.path, c.size) for c in changes.added] == [("lib/new.py", 6)]
    assert [(c.path, c.what, c.old_size, c.size) for c in changes.changed] == [
        ("longer.txt", "content", 6, 16),
        ("same-size.txt", "content", 5, 5),
        ("tool.sh", "mode", 10, 10),
    ]
    assert [(c.path, c.old_size) for c in changes.removed] == [("lib/gone.py", 6)]
    assert changes.unchanged == 1
    assert changes.growth == 6 + 16 + 5 + 10 - (6 + 5 + 10) - 6


def test_compare_release_without_a_current_release_adds_everything() -> None:
    changes = compare_release(None, {"a": entry("a"), "b/c": entry("cc")})
    assert [c.path for c in changes.added] == ["a", "b/c"]
    assert not changes.changed
    assert not changes.removed


def test_describe_runner_follows_applys_rule(tmp_path: Path) -> None:
    config = make_site(tmp_path)
    assert describe_runner("m/1.sql", b"SELECT 1;\n", 0o644, config) is None
    assert describe_runner("m/2.py", b"#!/usr/bin/env python3\n", 0o644, config) == "/usr/bin/env python3 m/2.py"
    assert describe_runner("m/3", b"\x7fELF", 0o755, config) == "m/3 (executable)"


def test_table_wraps_long_messages_and_subjects_within_80_columns() -> None:
    checks = [
        Check("cpus", "critical", "2 CPU cores, at least 4 required"),
        Check("free_space", "ok", "x " * 60, "/var/lib/a/very/long/mount/point/for/backups"),
    ]
    lines = render_checks(checks)
    assert lines[0].split() == ["LEVEL", "CHECK", "RESULT"]
    assert lines[1].startswith("critical cpus")
    assert "2 CPU cores, at least 4 required" in lines[1]
    assert lines[2] == "ok       free_space /var/lib/a/very/long/mount/point/for/backups"
    assert all(len(line) <= 80 for line in lines)
    assert all(line.startswith(" " * 9) for line in lines[3:])


def test_preflight_of_a_small_full_machine_lists_every_critical_check(tmp_path: Path) -> None:
    # Given a 2-core, 4 GiB machine whose filesystem is 95 % full
    config = make_site(tmp_path)
    machine = Machine(cpus=2, memory=4 * GIB, default_disk=DiskUsage(100 * GIB, 5 * GIB, 1, "/"))
    before = sorted(os.walk(tmp_path))
    # When preflight runs (no archive)
    report = build_report(config, probe=machine)
    text = render(report)
    # Then the table shows the three critical checks, the verdict, and nothing changed on disk
    rows = [" ".join(row.split()) for row in text.splitlines()]
    assert "critical cpus 2 CPU cores, at least 4 required" in rows
    assert "critical memory 4 GiB of memory, at least 8 GiB required" in rows
    assert any(row.startswith("critical free_space / 5 % free (5 GiB of 100 GiB), 30 % required;") for row in rows)
    assert rows[-1] == "3 critical, 2 notice(s), 4 ok: not ready"
    assert all(len(row) <= 80 for row in text.splitlines())
    assert sorted(os.walk(tmp_path)) == before
    # And the JSON says the same
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert data["counts"] == {"ok": 4, "notice": 2, "critical": 3}
    assert data["filesystems"][0]["roles"] == ["platform root", "data", "backups", "state"]
