"""`dropgate preflight` through the real command line, on this machine (real psutil), with real signed archives.

The site is real files under tmp_path (the `site` fixture); archives are built
with the real `dropgate pack`. Nothing is mocked: where a machine is needed that
this one is not, the thresholds are moved instead (configuration or archive).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import yaml

from pipeline.journal import Journal
from tests.conftest import ROOT, Site

GIB = 2**30
WARD_SQL = "ALTER TABLE patients ADD COLUMN ward text;\nCREATE INDEX patients_ward ON patients (ward);\n"


def pack(site: Site, version: str, files: dict[str, str], *, executable: tuple[str, ...] = (), **manifest: Any) -> Path:
    """A signed `gts.<version>.tgz` built by `dropgate pack` from `files` (path → text)."""
    private, _public = site.keypair()
    source = site.root / "build" / f"src-{version}"
    shutil.rmtree(source, ignore_errors=True)
    for name, text in files.items():
        path = source / "payload" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755 if name in executable else 0o644)
    body = {"product": "gts", "version": version, "channel": "stable", "min_version": "1.0.0", "payload": "payload"}
    body.update(manifest)
    (source / "manifest.yaml").write_text(yaml.safe_dump(body))
    out = site.root / "build" / f"gts.{version}.tgz"
    result = site.cli("pack", str(source), "--key", str(private), "-o", str(out))
    assert result.returncode == 0, result.stderr
    return out


def site_cli(site: Site, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with a chosen environment (site.cli with TMPDIR pointed at a folder we can inspect)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(site.config_path), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False,
    )  # fmt: skip


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` with its size, mode and mtime: to prove nothing changed."""
    entries = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        entries[str(path.relative_to(root))] = (info.st_size, info.st_mode, info.st_mtime_ns)
    return entries


def checks_of(output: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {f"{c['name']} {c['subject']}".strip(): c for c in output["checks"]}


def usable_cpus() -> int:
    return min(psutil.cpu_count(logical=True) or 1, len(os.sched_getaffinity(0)))


def test_preflight_reads_this_machine_with_psutil(site: Site) -> None:
    # Given a site whose thresholds this machine meets (the fixture's: 1 core, 0.25 GiB, 1 % free)
    # When the operator runs `dropgate preflight --json` on it
    result = site.cli("preflight", "--json")
    # Then nothing is critical, exit 0, and the numbers are this machine's
    assert result.returncode == 0, result.stdout + result.stderr
    output = json.loads(result.stdout)
    checks = checks_of(output)
    assert output["ok"] is True
    assert output["counts"]["critical"] == 0
    assert checks["cpus"] == {
        "name": "cpus", "level": "ok", "subject": "",
        "message": f"{usable_cpus()} CPU cores (1 required, 1 recommended)",
    }  # fmt: skip
    memory = psutil.virtual_memory().total / GIB
    assert checks["memory"]["message"].startswith(f"{memory:.1f}".removesuffix(".0") + " GiB of memory")
    free = [c for c in output["checks"] if c["name"] == "free_space"]
    assert len(free) == 1  # platform, data, backups and state share one filesystem here
    assert free[0]["message"].endswith("1 % required; holds platform root, data, backups, state")
    usage = psutil.disk_usage(str(site.root))
    assert output["filesystems"][0]["total_bytes"] == usage.total
    assert checks["version"]["message"] == "1.0.0 installed"
    assert checks["gate"]["message"] == "no run recorded yet"
    assert output["update"] is None


def test_preflight_table_fits_80_columns_and_exit_follows_the_critical_count(site: Site) -> None:
    # Given the vendor's default thresholds (this machine may or may not meet them)
    site.write_config(prereq={"min_cpus": 4, "recommended_cpus": 8, "min_memory_gib": 8,
                              "recommended_memory_gib": 16, "min_free_percent": 30})  # fmt: skip
    # When the operator runs `dropgate preflight` both ways
    table = site.cli("preflight")
    output = json.loads(site.cli("preflight", "--json").stdout)
    # Then the exit code is 1 exactly when something is critical
    critical = output["counts"]["critical"]
    assert table.returncode == (1 if critical else 0)
    assert (usable_cpus() < 4) == (checks_of(output)["cpus"]["level"] == "critical")
    # And the table is readable on an 80-column terminal, one row per check
    lines = table.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0] == "Installed release: 1.0.0"
    assert lines[2].split() == ["LEVEL", "CHECK", "RESULT"]
    cpus_row = next(line for line in lines if line.split()[1:2] == ["cpus"])
    assert cpus_row.split()[0] == checks_of(output)["cpus"]["level"]
    assert lines[-1].startswith(f"{critical} critical, ")


def test_preflight_of_an_archive_lists_files_changed_and_the_sql_it_will_run(site: Site, tmp_path: Path) -> None:
    # Given release 1.0.0 installed and an archive 1.1.0 that changes VERSION, removes app.txt,
    # adds a page, a pre-apply hook and an SQL migration run by psql
    site.write_config(platform={"migration_runners": {".sql": ["psql", "-v", "ON_ERROR_STOP=1", "-f"]}})
    archive = pack(
        site,
        "1.1.0",
        {
            "VERSION": "1.1.0\n",
            "pages/ward.html": "<h1>Ward</h1>\n",
            "hooks/pre.sh": "#!/bin/sh\necho pre\n",
            "migrations/001_ward.sql": WARD_SQL,
        },
        executable=("hooks/pre.sh",),
        hooks={"pre_apply": "hooks/pre.sh"},
        migrations=["migrations/001_ward.sql"],
        notes="Adds the ward to each patient.\n",
    )
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    before = {name: tree(site.root / name) for name in ("platform", "data", "state", "backups", "inbox")}
    # When the operator previews it (temporary files confined to TMPDIR)
    env = {**os.environ, "TMPDIR": str(scratch)}
    result = site_cli(site, env, "preflight", str(archive))
    as_json = site_cli(site, env, "preflight", str(archive), "--json")
    # Then it exits 0 and the table lists the versions, the downtime, the files and the SQL text
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "  Version     1.0.0 → 1.1.0 (stable)" in lines
    assert "  Downtime    yes: 1.0.0 → 1.1.0 changes the major or minor version" in lines
    assert "  Files       3 added, 1 changed, 1 removed, 0 unchanged (+95 B)" in lines
    assert "    added          90 B  migrations/001_ward.sql" in lines
    assert "    added          14 B  pages/ward.html" in lines
    assert "    changed         6 B  VERSION (content; was 6 B)" in lines
    assert "    removed              app.txt (was 28 B)" in lines
    assert "  Runs        1. pre-apply hook hooks/pre.sh" in lines
    assert "              2. migration migrations/001_ward.sql" in lines
    assert "                 with: psql -v ON_ERROR_STOP=1 -f migrations/001_ward.sql" in lines
    assert "                 | ALTER TABLE patients ADD COLUMN ward text;" in lines
    assert "                 | CREATE INDEX patients_ward ON patients (ward);" in lines
    assert "    Adds the ward to each patient." in lines
    assert any(line.startswith("ok       payload") and "4 files (" in line for line in lines)
    # And the JSON carries the same, with the whole SQL text
    update = json.loads(as_json.stdout)["update"]
    assert (update["from_version"], update["to_version"], update["downtime"]) == ("1.0.0", "1.1.0", True)
    assert [c["path"] for c in update["files"]["added"]] == [
        "hooks/pre.sh",
        "migrations/001_ward.sql",
        "pages/ward.html",
    ]
    assert update["files"]["changed"] == [{"path": "VERSION", "size": 6, "old_size": 6, "what": "content"}]
    assert update["files"]["removed"] == [{"path": "app.txt", "size": None, "old_size": 28, "what": ""}]
    assert update["migrations"] == [{
        "path": "migrations/001_ward.sql", "role": "migration", "sql": WARD_SQL,
        "runs_with": "psql -v ON_ERROR_STOP=1 -f migrations/001_ward.sql",
    }]  # fmt: skip
    assert update["hooks"] == {"pre_apply": "hooks/pre.sh", "post_apply": None}
    assert update["release_bytes"] == 6 + 14 + 19 + len(WARD_SQL)
    # And nothing on the site changed, and the temporary folder is gone
    assert {name: tree(site.root / name) for name in before} == before
    assert list(scratch.iterdir()) == []


def test_an_archive_raises_the_thresholds(site: Site) -> None:
    # Given an archive that needs more cores than any machine here has
    archive = pack(site, "1.0.1", {"VERSION": "1.0.1\n"}, requirements={"min_cpus": 4096})
    # When it is previewed
    result = site.cli("preflight", str(archive), "--json")
    # Then the cores are critical, said to be raised by the archive, and the exit code is 1
    assert result.returncode == 1
    cpus = checks_of(json.loads(result.stdout))["cpus"]
    assert cpus["level"] == "critical"
    assert cpus["message"] == f"{usable_cpus()} CPU cores, at least 4096 required (raised by the archive)"
    assert json.loads(result.stdout)["thresholds"]["raised_by_archive"] == ["min_cpus", "recommended_cpus"]


def test_an_sql_migration_that_nothing_can_run_is_critical(site: Site) -> None:
    # Given no migration runner for .sql and a migration that is not executable
    archive = pack(site, "1.0.1", {"VERSION": "1.0.1\n", "m/1.sql": "SELECT 1;\n"}, migrations=["m/1.sql"])
    # When it is previewed
    result = site.cli("preflight", str(archive))
    # Then apply's failure is foretold, before any downtime
    assert result.returncode == 1
    assert "critical scripts" in result.stdout
    assert "platform.migration_runners entry for .sql: apply would fail" in " ".join(result.stdout.split())
    assert "                 | SELECT 1;" in result.stdout.splitlines()


def test_an_archive_signed_by_an_unknown_key_is_critical(site: Site, tmp_path: Path) -> None:
    # Given an archive signed by a key the site does not trust
    site.keypair()
    other = tmp_path / "other"
    assert site.cli("keygen", "-o", str(other)).returncode == 0
    source = tmp_path / "src"
    (source / "payload").mkdir(parents=True)
    (source / "payload" / "VERSION").write_text("1.0.1\n")
    (source / "manifest.yaml").write_text(yaml.safe_dump({"product": "gts", "version": "1.0.1", "payload": "payload"}))
    archive = tmp_path / "gts.1.0.1.tgz"
    assert site.cli("pack", str(source), "--key", f"{other}.key", "-o", str(archive)).returncode == 0
    # When it is previewed
    result = site.cli("preflight", str(archive), "--json")
    # Then the archive check is critical and there is no preview of an untrusted archive
    assert result.returncode == 1
    output = json.loads(result.stdout)
    assert output["checks"][0]["name"] == "archive"
    assert output["checks"][0]["level"] == "critical"
    assert output["checks"][0]["message"].startswith("gts.1.0.1.tgz: ")
    assert output["update"] is None


def test_a_damaged_payload_is_critical_and_leaves_no_temporary_files(site: Site, tmp_path: Path) -> None:
    # Given a signed archive whose last bytes (inside the payload) were damaged after signing
    archive = pack(site, "1.0.1", {"VERSION": "1.0.1\n", "big.txt": "lorem ipsum " * 5000})
    data = bytearray(archive.read_bytes())
    data[-40] ^= 0xFF
    archive.write_bytes(bytes(data))
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # When it is previewed
    result = site_cli(site, {**os.environ, "TMPDIR": str(scratch)}, "preflight", str(archive), "--json")
    # Then its signature is fine but its payload is refused, and the temporary folder is gone
    assert result.returncode == 1, result.stderr
    checks = checks_of(json.loads(result.stdout))
    assert checks["archive"]["level"] == "ok"
    assert checks["payload"]["level"] == "critical"
    assert checks["payload"]["message"].startswith("gts.1.0.1.tgz: ")
    assert list(scratch.iterdir()) == []


def test_a_blocked_gate_is_critical(site: Site) -> None:
    # Given a run that rolled back and is not yet resolved
    journal = Journal(site.state / "journal.db")
    run_id = journal.add_run("gts.1.0.1.tgz", spool=site.state / "spool", arrived=1.0)
    journal.update_run(run_id, step="verify", outcome="rolled_back", finished=2.0)
    journal.close()
    # When the operator runs preflight
    result = site.cli("preflight")
    # Then it says what blocks and how to unblock it
    assert result.returncode == 1
    rows = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert f"critical gate blocked by run {run_id} (rolled_back): nothing runs until `dropgate resolve {run_id}`" in (
        " ".join(rows)
    )


def test_configuration_and_usage_errors_exit_2(site: Site) -> None:
    assert site.cli("preflight", str(site.root / "missing.tgz")).returncode == 2
    site.write_config(prereq={"min_cpu": 4})
    result = site.cli("preflight")
    assert result.returncode == 2
    assert "prereq.min_cpu: unknown key" in result.stderr
