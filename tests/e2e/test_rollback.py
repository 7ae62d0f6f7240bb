"""Rollback end to end: the real daemon, real signed archives, a platform tree with data and a dump.

Each update runs a migration that really changes the platform's data (rewrites,
adds and removes files, changes modes) and its database file (kept outside the
data paths, so only the dump brings it back). The platform must end
byte-identical to before the update: the full tree hash includes every path,
type, mode, owner, mtime and content.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

from tests.conftest import Site, wait_for
from tests.support import tree_digest


def populate(site: Site) -> Path:
    """A data tree worth restoring, and a database file only the dump covers; returns the database."""
    data = site.data
    (data / "uploads" / "2026" / "11").mkdir(parents=True)
    for n in range(40):
        (data / "uploads" / "2026" / "11" / f"scan-{n:02d}.pdf").write_bytes(os.urandom(4096 + 37 * n))
    (data / "uploads" / "large.bin").write_bytes(os.urandom(3 * 2**20))
    (data / "config").mkdir()
    (data / "config" / "app.key").write_text("secret\n")
    (data / "config" / "app.key").chmod(0o600)
    (data / "config").chmod(0o750)
    (data / "latest.pdf").symlink_to("uploads/2026/11/scan-07.pdf")
    # names written by old tools in Latin-1: bytes that are not UTF-8, in a folder, a file and a link
    latin = data / os.fsdecode(b"r\xe9sultats")
    latin.mkdir()
    (latin / os.fsdecode(b"compte-rendu-\xe9t\xe9.pdf")).write_bytes(os.urandom(2048))
    (data / os.fsdecode(b"derni\xe8re.pdf")).symlink_to(os.fsdecode(b"r\xe9sultats/compte-rendu-\xe9t\xe9.pdf"))
    database = site.root / "db.sqlite"
    database.write_bytes(b"TABLE patients v1\n" * 1000)
    site.write_config(
        backup={
            "dumps": [
                {
                    "name": "db",
                    "command": ["cat", str(database)],
                    "restore": {"shell": f'cat > "{database}"'},
                }
            ]
        }
    )
    return database


def damaging_migration(site: Site, database: Path, *, exit_code: int) -> str:
    """A migration that changes every kind of thing in the data and the database, then exits `exit_code`."""
    data = site.data
    return f"""#!/bin/sh
set -e
echo "patient records, migrated" > "{data}/records.txt"
rm "{data}/uploads/2026/11/scan-03.pdf"
echo new > "{data}/uploads/2026/11/added-by-migration.txt"
mkdir -p "{data}/cache/tmp" && echo x > "{data}/cache/tmp/x"
chmod 0644 "{data}/config/app.key"
chmod 0777 "{data}/config"
dd if=/dev/zero of="{data}/uploads/large.bin" bs=4096 count=1 seek=10 conv=notrunc 2>/dev/null
rm "{data}/latest.pdf" && ln -s uploads/2026/11/scan-09.pdf "{data}/latest.pdf"
echo "TABLE patients v2" >> "{database}"
exit {exit_code}
"""


def update(site: Site, version: str, migration: str) -> Path:
    return site.pack(version, files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"])


def test_an_update_failing_in_apply_is_rolled_back_to_a_byte_identical_platform(site: Site) -> None:
    # Given a platform with data and a database, and an update whose migration changes both, then fails
    database = populate(site)
    data_before, database_before = tree_digest(site.data), database.read_bytes()
    archive = update(site, "1.1.0", damaging_migration(site, database, exit_code=3))
    site.start_daemon()

    # When the update runs
    site.drop(archive)
    run = site.wait_outcome(1, timeout=120)

    # Then the run ends rolled_back: the previous release live, the data and database exactly as before
    assert run["outcome"] == "rolled_back", run["error"]
    assert "migration 1/1 migrations/001.sh failed with exit code 3" in run["error"]
    assert os.readlink(site.platform / "current") == "releases/1.0.0"
    assert tree_digest(site.data) == data_before
    assert database.read_bytes() == database_before
    assert not (site.root / "run" / "maintenance").exists()
    messages = [event["message"] for event in site.show(1)["events"]]
    assert any(m.startswith("snapshot of 1 path: 44 files") and m.endswith("verified") for m in messages)
    assert any(m.startswith("data restored in ") for m in messages)
    assert any(m.startswith("dump db restored from ") for m in messages)
    # And the gate is blocked until an operator looks
    assert site.status()["gate"] == "blocked"


def test_an_update_failing_in_verify_is_rolled_back_to_the_previous_release_and_data(site: Site) -> None:
    # Given an update whose migration succeeds in changing the data, and whose release is broken:
    # the health check passes on 1.0.0 and fails once current points at 1.1.0
    database = populate(site)
    data_before, database_before = tree_digest(site.data), database.read_bytes()
    site.write_config(
        verify={"commands": [["test", "!", "-e", str(site.platform / "current" / "BROKEN")]], "interval_seconds": 0.2},
        policy={"timeouts": {"verify": "3s"}},
    )
    archive = site.pack(
        "1.1.0",
        files={"migrations/001.sh": damaging_migration(site, database, exit_code=0), "BROKEN": "yes\n"},
        migrations=["migrations/001.sh"],
    )
    site.start_daemon()

    # When the update is applied (current switched to 1.1.0) and fails its checks
    site.drop(archive)
    run = site.wait_outcome(1, timeout=120)

    # Then it ends rolled_back with 1.0.0 live again and the data and database byte-identical
    assert run["outcome"] == "rolled_back", run["error"]
    assert run["step"] in ("verify", "rollback", "rolled_back")
    messages = [event["message"] for event in site.show(1)["events"]]
    assert any("current → releases/1.1.0" in m for m in messages)  # it really was switched
    assert os.readlink(site.platform / "current") == "releases/1.0.0"
    assert tree_digest(site.data) == data_before
    assert database.read_bytes() == database_before
    assert site.status()["gate"] == "blocked"


def test_with_policy_hold_the_operator_rolls_back_and_the_platform_is_restored(site: Site) -> None:
    # Given policy hold: a failed update stays as it failed, for support to inspect
    database = populate(site)
    data_before, database_before = tree_digest(site.data), database.read_bytes()
    site.write_config(policy={"on_failure": "hold"})
    site.start_daemon()
    site.drop(update(site, "1.1.0", damaging_migration(site, database, exit_code=1)))
    run = site.wait_outcome(1, timeout=120)
    assert run["outcome"] == "failed", run["error"]
    assert tree_digest(site.data) != data_before  # left as the migration made it

    # When the operator asks for a rollback
    result = site.cli("rollback", "1")

    # Then the run is rolled_back and the platform byte-identical to before the update
    assert result.returncode == 0, result.stderr
    assert site.run(1)["outcome"] == "rolled_back"  # type: ignore[index]
    assert tree_digest(site.data) == data_before
    assert database.read_bytes() == database_before
    assert os.readlink(site.platform / "current") == "releases/1.0.0"
    listing = site.cli("backups", "--json")
    assert listing.returncode == 0, listing.stderr
    assert '"verified": true' in listing.stdout


def test_a_rollback_from_a_damaged_snapshot_fails_loudly_and_leaves_the_snapshot_alone(site: Site) -> None:
    # Given an update whose migration also damages this run's snapshot (same size, so only the hash tells)
    database = populate(site)
    ref = site.root / "mtime-ref"
    tamper = (
        'copy="$DROPGATE_BACKUP_DIR/data/data/records.txt"\n'
        f'touch -r "$copy" "{ref}"\n'
        'printf "PATIENT RECORDS\\n" > "$copy"\n'
        f'touch -r "{ref}" "$copy"\n'
        "exit 1"
    )
    migration = damaging_migration(site, database, exit_code=1).replace("exit 1", tamper)
    site.start_daemon()
    site.drop(update(site, "1.1.0", migration))

    # When the update fails and the automatic rollback finds the snapshot damaged
    run = site.wait_outcome(1, timeout=120)
    snapshot = site.backups / "1"

    # Then the rollback fails loudly: the run is not rolled_back, the gate is blocked,
    # the error names the damaged file, and the snapshot is left exactly as found
    assert run["outcome"] != "rolled_back"
    assert "ROLLBACK FAILED" in run["error"]
    assert f"{snapshot}/data/data/records.txt: content differs from the manifest" in run["error"]
    assert site.status()["gate"] == "blocked"
    assert (snapshot / "data" / "data" / "records.txt").read_text() == "PATIENT RECORDS\n"
    assert (site.data / "records.txt").read_text() == "patient records, migrated\n"  # nothing was restored
    checked = site.cli("backups", "verify", "1")
    assert checked.returncode == 1
    assert "records.txt: content differs from the manifest" in checked.stdout


def test_an_interrupted_update_is_not_rolled_back_by_a_restart_only_by_the_operator(site: Site) -> None:
    # Given an update whose migration changes the data, then waits while `hold` exists
    database = populate(site)
    data_before, database_before = tree_digest(site.data), database.read_bytes()
    hold, pidfile, changed = site.root / "hold", site.root / "migration.pid", site.root / "changed"
    hold.touch()
    migration = damaging_migration(site, database, exit_code=0).replace(
        "exit 0",
        f'echo $$ > "{pidfile}"\ntouch "{changed}"\nwhile [ -e "{hold}" ]; do sleep 0.1; done\nexit 0',
    )
    daemon = site.start_daemon()
    site.drop(update(site, "1.1.0", migration))
    try:
        wait_for(changed.exists, timeout=120, what="the migration to change the data")
        changed_digest = tree_digest(site.data)
        assert changed_digest != data_before

        # When the daemon dies in the middle of apply and starts again
        daemon.kill()
        site.start_daemon()

        # Then the run is interrupted, the gate blocked, and nothing was restored on its own
        run = site.wait_outcome(1)
        assert run["outcome"] == "interrupted"
        assert "the platform WAS changed" in run["error"]
        assert f"dropgate rollback {run['id']}" in run["error"]
        assert site.status()["gate"] == "blocked"
        assert tree_digest(site.data) == changed_digest
    finally:
        hold.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)  # the orphan of the killed daemon

    # When the operator rolls it back
    result = site.cli("rollback", "1")

    # Then the platform is byte-identical to before the update, the previous release live
    assert result.returncode == 0, result.stderr
    assert site.run(1)["outcome"] == "rolled_back"  # type: ignore[index]
    assert tree_digest(site.data) == data_before
    assert database.read_bytes() == database_before
    assert os.readlink(site.platform / "current") == "releases/1.0.0"


def test_successive_updates_share_unchanged_files_and_pruning_keeps_the_last_success(site: Site) -> None:
    # Given keep: 1, and three patches, the data changing a little before each
    populate(site)
    site.write_config(backup={"keep": 1})
    site.start_daemon()
    for run_id, version in enumerate(("1.0.1", "1.0.2", "1.0.3"), start=1):
        (site.data / "records.txt").write_text(f"patient records, day {run_id}\n")
        site.drop(site.pack(version))
        run = site.wait_outcome(run_id, timeout=120)
        assert run["outcome"] == "succeeded", run["error"]
        if run_id == 2:
            # Then the second snapshot shares every unchanged file with the first, never with the live data
            first, second = site.backups / "1" / "data" / "data", site.backups / "2" / "data" / "data"
            scan = Path("uploads") / "large.bin"
            assert (first / scan).stat().st_ino == (second / scan).stat().st_ino
            assert (site.data / scan).stat().st_ino != (second / scan).stat().st_ino
            assert (first / "records.txt").stat().st_ino != (second / "records.txt").stat().st_ino
            assert sorted(os.listdir(site.backups)) == ["1", "2"]  # 1 is the last success's: kept

    # And after the third, beyond keep: 1, only the last success's (2) and the newest (3) remain
    assert sorted(os.listdir(site.backups)) == ["2", "3"]
    listing = site.cli("backups", "--json")
    assert listing.returncode == 0, listing.stderr
    snapshots = json.loads(listing.stdout)
    assert [(s["run"], s["verified"], s["shared_files"]) for s in snapshots] == [(3, True, 43), (2, True, 43)]
    assert site.metric("dropgate_backup_bytes") == snapshots[0]["bytes"]


def test_a_failure_entering_maintenance_restores_no_data_and_keeps_writes_made_since_the_backup(site: Site) -> None:
    # Given a minor update (downtime) whose stop command fails after users wrote to the data
    # (the platform stays in service during the backup, so writes after it are real)
    records = site.data / "records.txt"
    site.write_config(
        platform={
            "services": {
                "stop": [{"shell": f'echo "written after the backup" >> "{records}"; exit 1'}],
                "start": [["true"]],
            }
        }
    )
    daemon = site.start_daemon()
    site.drop(site.pack("1.1.0"))
    # When the maintenance step fails and the rollback path runs
    run = site.wait_outcome(1, timeout=120)
    # Then nothing is restored over the live data: apply never began
    assert run["outcome"] == "rolled_back", run["error"]
    assert "stop 1/1 failed with exit code 1" in run["error"]
    events = [e["message"] for e in site.show(1)["events"]]
    assert any("apply had not begun" in m for m in events)
    assert records.read_text().endswith("written after the backup\n")
    assert os.readlink(site.platform / "current") == "releases/1.0.0"
    assert not (site.root / "run" / "maintenance").exists()
    assert (site.backups / "1" / "snapshot.json").exists()  # the backup is kept
    daemon.stop()
