"""No rollback starts while a command of an earlier daemon survives (it could undo the restore).

The start-up sweep kills such survivors; one it could not kill keeps its record.
A process that SIGKILL cannot end cannot be made here, so the survivor is a
real `sleep` in its own session recorded as an earlier daemon would have
recorded it (a real journal, the real runner thread, real /proc identity).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from pipeline.config import STEPS, load_config
from pipeline.context import StepContext
from pipeline.errors import ControlRefused, StepFailed
from pipeline.journal import Journal
from pipeline.observers import Observers
from pipeline.runner import Runner
from pipeline.sessions import CommandRecord, boot_id, start_ticks
from tests.conftest import Site, wait_for


@pytest.fixture
def survivor() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_a_rollback_is_refused_while_a_survivor_runs_and_goes_ahead_once_it_ended(
    site: Site, survivor: subprocess.Popen[bytes]
) -> None:
    # Given a failed run that changed the platform, and a migration of it that an earlier daemon left running
    config = load_config(site.config_path)
    journal = Journal(site.state / "journal.db")
    run_id = journal.add_run("gts.1.0.1.tgz", spool=site.state / "spool", arrived=time.time())
    previous = str((site.platform / "releases" / "1.0.0").resolve())
    journal.update_run(
        run_id, step="apply", outcome="failed", platform_changed=True, facts={"previous_release": previous}
    )
    ticks = start_ticks(survivor.pid)
    assert ticks is not None
    label = "migration 1/1 migrations/001.sh"
    journal.command_started(
        CommandRecord("t1", label, "/bin/sh 001.sh", survivor.pid, ticks, boot_id(), time.time(), run_id)
    )
    runner = Runner(config, journal, Observers([]))
    runner.start()
    try:
        # When the operator asks for the rollback, it is refused, naming the survivor; nothing changed
        with pytest.raises(ControlRefused) as refused:
            runner.rollback(run_id, "tester").result(timeout=60)
        assert f"{label} (pid {survivor.pid}" in str(refused.value)
        assert "no rollback starts until it has ended" in str(refused.value)
        assert journal.run(run_id).outcome == "failed"  # type: ignore[union-attr]
        assert not (site.root / "run" / "maintenance").exists()
        # Once it has ended, the same command goes ahead
        survivor.kill()
        survivor.wait()
        message = runner.rollback(run_id, "tester").result(timeout=60)
        assert "rolled back" in message
        assert journal.run(run_id).outcome == "rolled_back"  # type: ignore[union-attr]
    finally:
        runner.request_stop()
        runner.join(timeout=30)
        journal.close()


def test_an_automatic_rollback_does_not_start_while_a_survivor_runs(
    site: Site, survivor: subprocess.Popen[bytes]
) -> None:
    # Given steps where apply changes the platform and fails (the real runner and journal; the steps are
    # stand-ins: what matters is whether the rollback step is entered), and a survivor of an earlier daemon
    entered: list[str] = []

    def ok(ctx: StepContext) -> None:
        entered.append(ctx.step)

    def failing_apply(ctx: StepContext) -> None:
        ctx.save_facts(previous_release=str(site.platform / "releases" / "1.0.0"))
        ctx.update_run(platform_changed=True)
        raise StepFailed("migration 1/1 failed with exit code 3")

    steps = {name: SimpleNamespace(run=ok) for name in (*STEPS, "rollback")}
    steps["apply"] = SimpleNamespace(run=failing_apply)
    for optional in ("approval", "window", "maintenance"):
        steps[optional] = SimpleNamespace(run=ok, required=lambda config, facts: False)
    config = load_config(site.config_path)
    journal = Journal(site.state / "journal.db")
    ticks = start_ticks(survivor.pid)
    assert ticks is not None
    journal.command_started(CommandRecord("t1", "restore db", "psql", survivor.pid, ticks, boot_id(), time.time(), 1))
    run_id = journal.add_run("gts.1.0.1.tgz", spool=site.state / "spool", arrived=time.time())
    runner = Runner(config, journal, Observers([]), steps=steps)  # type: ignore[arg-type]
    runner.start()
    try:
        # When the run fails in apply (policy rollback)
        wait_for(lambda: journal.run(run_id).outcome, timeout=60, what="the run to end")  # type: ignore[union-attr]
        run = journal.run(run_id)
        # Then the rollback was not started: the run failed, saying why, and the gate is blocked
        assert run is not None and run.outcome == "failed"
        assert "ROLLBACK NOT STARTED" in (run.error or "")
        assert f"restore db (pid {survivor.pid}" in (run.error or "")
        assert "rollback" not in entered
        assert journal.gate() == "blocked"
    finally:
        runner.request_stop()
        runner.join(timeout=30)
        journal.close()
