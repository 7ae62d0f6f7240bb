"""What monitoring reads after each operator command, without a restart in between.

`dropgate_maintenance_active` feeds the "maintenance too long" alert: once an
operator has resolved the run it stays 0 (it read 1 until the daemon was
restarted, so the alert never cleared). The operator's rollback is also killed
halfway (SIGKILL during its restore command): the restart, the second rollback
and the resolve must each leave the gate, the step and maintenance as they are.
Real daemon, real HTTP scrapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, Site, wait_for
from tests.support import tree_digest


def failing_verify(site: Site) -> None:
    """Verification passes on 1.0.0 (prereq's health check) and fails on anything else."""
    site.write_config(
        verify={
            "commands": [["grep", "-qx", "1.0.0", str(site.platform / "current" / "VERSION")]],
            "interval_seconds": 0.2,
        },
        policy={"on_failure": "hold", "timeouts": {"verify": "3s"}},
    )


def status_json(site: Site) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{site.port}/status.json", timeout=5) as response:
        return dict(json.loads(response.read()))


def metric_is(site: Site, name: str, value: float, labels: str = "") -> None:
    wait_for(
        lambda: site.metric(name, labels) == value,
        timeout=30,
        what=f"{name}{{{labels}}} to read {value} (reads {site.metric(name, labels)})",
    )


def assert_open_gate(site: Site) -> None:
    metric_is(site, "dropgate_maintenance_active", 0.0)
    metric_is(site, "dropgate_blocked", 0.0)
    metric_is(site, "dropgate_gate", 1.0, 'dropgate_gate="idle"')
    assert site.metric("dropgate_step", 'dropgate_step="none"') == 1.0
    assert status_json(site)["gate"] == "idle"


@pytest.mark.parametrize("flag_left", [True, False])
def test_resolving_a_held_failure_in_maintenance_clears_the_maintenance_metric(site: Site, flag_left: bool) -> None:
    # Given a minor update (downtime) whose verify fails, held in maintenance for inspection
    failing_verify(site)
    site.start_daemon()
    site.drop(site.pack("1.1.0"))
    assert site.wait_outcome(1, timeout=120)["outcome"] == "failed"
    flag = site.root / "run" / "maintenance"
    assert flag.exists()
    metric_is(site, "dropgate_maintenance_active", 1.0)
    metric_is(site, "dropgate_blocked", 1.0)
    # When support repaired it by hand (flag removed or not yet) and the operator resolves it
    if not flag_left:
        flag.unlink()
    result = site.cli("resolve", "1", "--note", "repaired by hand")
    assert result.returncode == 0, result.stderr
    assert ("maintenance flag" in result.stdout) is flag_left
    # Then every signal says the gate is open and no run holds maintenance
    assert_open_gate(site)
    assert site.status()["run"]["maintenance"] is False


def test_resolving_a_run_interrupted_in_maintenance_clears_the_maintenance_metric(site: Site) -> None:
    # Given a minor update killed in apply (maintenance on), restarted: interrupted, maintenance still on
    hold = site.root / "hold"
    hold.touch()
    migration = f'#!/bin/sh\nwhile [ -e "{hold}" ]; do sleep 0.1; done\n'
    daemon = site.start_daemon()
    site.drop(site.pack("1.1.0", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"]))
    site.wait_step(1, "apply")
    daemon.kill()
    hold.unlink()
    site.start_daemon()
    assert site.wait_outcome(1)["outcome"] == "interrupted"
    metric_is(site, "dropgate_maintenance_active", 1.0)
    # When the operator rolls it back, then resolves it
    result = site.cli("rollback", "1")
    assert result.returncode == 0, result.stderr
    metric_is(site, "dropgate_maintenance_active", 0.0)
    metric_is(site, "dropgate_step", 1.0, 'dropgate_step="none"')
    metric_is(site, "dropgate_gate", 1.0, 'dropgate_gate="blocked"')
    assert site.cli("resolve", "1", "--note", "rolled back").returncode == 0
    # Then the gate is open everywhere
    assert_open_gate(site)


def test_an_operators_rollback_killed_in_its_restore_is_interrupted_and_a_second_one_restores(site: Site) -> None:
    # Given a held failure whose migration changed the data and the database
    failing = site.root / "db"
    failing.write_text("TABLE patients v1\n")
    (site.data / "big.bin").write_bytes(b"\1" * (3 * 2**20))
    (site.data / "sub").mkdir()
    (site.data / "sub" / "empty").write_bytes(b"")
    (site.data / "sub" / "link").symlink_to("../records.txt")
    pidfile, hold = site.root / "restore.pid", site.root / "hold"
    hold.touch()
    restore = f'echo $$ > "{pidfile}"; while [ -e "{hold}" ]; do sleep 0.1; done; cat > "{failing}"'
    site.write_config(
        backup={"dumps": [{"name": "db", "command": ["cat", str(failing)], "restore": {"shell": restore}}]},
        policy={"on_failure": "hold"},
    )
    data_before, db_before = tree_digest(site.data), failing.read_bytes()
    migration = (
        f'#!/bin/sh\necho v2 >> "{failing}"\nrm "{site.data}/big.bin"\necho changed > "{site.data}/records.txt"\n'
        "exit 1\n"
    )
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1", files={"migrations/001.sh": migration}, migrations=["migrations/001.sh"]))
    assert site.wait_outcome(1, timeout=120)["outcome"] == "failed"
    # When the operator's rollback is under way (its restore command runs) and the daemon is killed
    client = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--config", str(site.config_path), "rollback", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for(pidfile.exists, what="the restore command")
    metric_is(site, "dropgate_step", 1.0, 'dropgate_step="rollback"')
    metric_is(site, "dropgate_gate", 1.0, 'dropgate_gate="busy"')
    daemon.kill()
    _, err = client.communicate(timeout=60)
    assert client.returncode == 3, err  # the operator is told the daemon went away, not that it worked
    site.start_daemon()
    # Then the run is interrupted in rollback, blocked, its restore command ended and named
    run = site.wait_outcome(1)
    assert run["outcome"] == "interrupted" and "the daemon stopped during rollback" in run["error"]
    assert "dropgate rollback 1" in run["error"]
    assert any(e["message"].startswith("killed restore db (pid ") for e in site.show(1)["events"])
    metric_is(site, "dropgate_blocked", 1.0)
    metric_is(site, "dropgate_step", 1.0, 'dropgate_step="none"')
    # And a second rollback restores data and database byte for byte, and resolve opens the gate
    hold.unlink()
    result = site.cli("rollback", "1")
    assert result.returncode == 0, result.stderr
    assert site.run(1)["outcome"] == "rolled_back"  # type: ignore[index]
    assert tree_digest(site.data) == data_before and failing.read_bytes() == db_before
    assert not [p for p in Path(site.data).iterdir() if p.name.startswith(".dropgate-restore-")]
    assert site.cli("resolve", "1", "--note", "restored").returncode == 0
    assert_open_gate(site)
