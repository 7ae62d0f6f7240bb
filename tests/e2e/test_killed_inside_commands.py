"""The daemon SIGKILLed inside the effect of an operator's command, then started again.

An answer given to the operator must hold after a crash. `dropgate reject`
answers once the rejection is recorded, and the runner then ends the run and
sets its archive aside: a kill between the two must not bring the run back to
wait for an approval (an `approve` then installed a rejected update). A
`retry` whose answer a crash cut off is asked again: the archive still runs once.

The kill lands at an exact point: `strace` attached to the daemon delivers
SIGKILL when it renames the spooled archive into `rejected/` (strace's
`inject=...:signal=`), i.e. after the rejection was recorded and before the
outcome (the answer races the kill: it may or may not have reached the operator). Everything
else is real: the daemon, the CLI, the journal, the restart.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import pytest

from pipeline.schedule import DAYS
from tests.conftest import DaemonProcess, Site, require_tool


@contextmanager
def killed_at(daemon: DaemonProcess, path: str, calls: str) -> Iterator[None]:
    """SIGKILL `daemon` the moment any of its threads makes one of the system calls `calls` (comma-separated,
    strace's names) on `path`, before the call happens."""
    strace = require_tool("strace")
    tracer = subprocess.Popen(
        [
            strace, "-f", "-p", str(daemon.pid), "-o", "/dev/null",
            "-e", f"trace={calls}", "-P", path,
            "-e", f"inject={calls}:signal=SIGKILL",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tracer.stderr is not None
    try:
        attached = tracer.stderr.readline()  # "Process N attached" once it holds the daemon
        assert "attached" in attached, f"strace could not attach: {attached}{tracer.stderr.read()}"
        yield
        daemon.proc.wait(timeout=60)
        assert daemon.proc.returncode == -9, f"the daemon was not killed at {calls} of {path}"
    finally:
        tracer.kill()
        tracer.wait(timeout=30)


def killed_when_renaming(daemon: DaemonProcess, path: str) -> AbstractContextManager[None]:
    """SIGKILL `daemon` the moment it renames `path` (before the rename happens)."""
    return killed_at(daemon, path, "rename,renameat,renameat2")


def killed_when_opening(daemon: DaemonProcess, path: str) -> AbstractContextManager[None]:
    """SIGKILL `daemon` the moment it opens `path` (e.g. a new run's log, written just after its commit)."""
    return killed_at(daemon, path, "open,openat")


def closed_window() -> str:
    """A window of an hour that opens three hours from now: closed for the whole test."""
    start = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)).replace(second=0, microsecond=0)
    end = start + dt.timedelta(hours=1)
    return f"{DAYS[start.weekday()]} {start:%H:%M}-{DAYS[end.weekday()]} {end:%H:%M}"


WAITS = {
    "approval": {"require_approval": True},
    "window": {"windows": [closed_window()], "windows_for": "all", "timezone": "UTC"},
}


@pytest.mark.parametrize(
    ("step", "policy_after"),
    [
        ("approval", {}),
        ("window", {}),
        ("approval", {"require_approval": False}),  # restarted with the wait switched off
        ("window", {"windows": []}),
    ],
)
def test_a_rejection_answered_then_cut_short_by_sigkill_holds_after_the_restart(
    site: Site, step: str, policy_after: dict[str, object]
) -> None:
    # Given a run waiting in approval or window
    site.write_config(policy=WAITS[step])
    daemon = site.start_daemon()
    archive = site.pack("1.0.1")
    site.drop(archive)
    run = site.wait_step(1, step)
    # When an operator rejects it and the daemon dies after answering, before it set the archive aside
    with killed_when_renaming(daemon, str(run["path"])):
        answer = site.cli("reject", "1", "--note", "not during the audit")
    # (the answer and the kill race: either the operator was told, or the command was cut off)
    assert (answer.returncode, answer.stdout.startswith("run 1 rejected")) in ((0, True), (3, False)), answer
    assert site.run(1)["outcome"] is None  # type: ignore[index]  # the crash came before the outcome
    assert any(e["message"].startswith("rejected by root") for e in site.show(1)["events"])  # but after the record
    site.write_config(policy=policy_after)
    site.start_daemon()
    # Then the restart does not bring it back: it ends rejected by that operator, with the note
    ended = site.wait_outcome(1, timeout=120)
    assert ended["outcome"] == "rejected"
    assert ended["error"].startswith("rejected by the operator root (pid ") and "not during the audit" in ended["error"]
    aside = site.state / "rejected" / "1-gts.1.0.1.tgz"
    assert aside.read_bytes() == archive.read_bytes()
    assert not (site.platform / ".staging" / "1").exists()
    assert sorted(p.name for p in (site.platform / "releases").iterdir()) == ["1.0.0"]
    assert site.status()["installed_version"] == "1.0.0"
    # and nothing lets it through: approve refuses, the same bytes are a repeat, the gate is open
    refused = site.cli("approve", "1")
    assert refused.returncode == 1 and "(it is rejected)" in refused.stderr
    assert site.status()["gate"] == "idle"
    assert site.metric("dropgate_gate", 'dropgate_gate="idle"') == 1.0
    assert site.metric("dropgate_runs_total", 'outcome="rejected"') == 1.0
    assert site.metric("dropgate_step", 'dropgate_step="none"') == 1.0
    site.drop(archive)
    again = site.wait_outcome(2)
    assert again["outcome"] == "rejected" and "was already rejected as run 1" in again["error"]
    # run 2 has ended, so the runner has polled since: run 1 must not have moved
    assert site.run(1)["outcome"] == "rejected"  # type: ignore[index]



@pytest.mark.parametrize("how", ["asked twice", "answer lost to a crash"])
def test_a_retry_asked_again_while_the_first_is_pending_queues_the_archive_once(site: Site, how: str) -> None:
    # Given a run an operator rejected, then wants after all
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    assert site.cli("reject", "1", "--note", "not today").returncode == 0
    assert site.wait_outcome(1)["outcome"] == "rejected"
    # When `retry 1` is asked, and asked again before the new run ran (a second click, or after a crash
    # that cut off the first answer once the new run was recorded)
    if how == "asked twice":
        first = site.cli("retry", "1")
        assert first.returncode == 0 and "queued again as run 2" in first.stdout, first
    else:
        with killed_when_opening(daemon, str(site.state / "runs" / "2.log")):
            first = site.cli("retry", "1")
        assert first.returncode in (0, 3), first
        site.start_daemon()
    site.wait_step(2, "approval", timeout=120)
    again = site.cli("retry", "1")
    # Then the second is refused naming the run that is queued, and the archive runs once
    assert again.returncode == 1
    assert again.stderr.strip() == "dropgate: run 1 is queued again already, as run 2: it runs once"
    assert site.cli("approve", "2").returncode == 0
    assert site.wait_outcome(2, timeout=120)["outcome"] == "succeeded"
    runs = site.history()
    assert [(run["id"], run["outcome"]) for run in runs] == [(2, "succeeded"), (1, "rejected")]
    assert site.show(2)["retry_of"] == 1
    assert sorted(p.name for p in (site.state / "spool").iterdir()) == ["2"]
