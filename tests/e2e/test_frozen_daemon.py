"""A frozen daemon (SIGSTOP: as a hung disk or a deadlock would leave it) is seen as frozen.

`status` reads the heartbeat the main loop leaves in the state folder and says
"not responding for N" instead of "running"; the control commands give up in
one line with exit 3; and a request the daemon reads after its sender gave up
is not carried out when the daemon thaws.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pipeline.heartbeat import STALE_SECONDS
from tests.conftest import DaemonProcess, Site, wait_for


@contextmanager
def frozen(daemon: DaemonProcess) -> Iterator[None]:
    """The daemon stopped with SIGSTOP for the block, continued afterwards whatever happened."""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


def liveness(site: Site) -> dict[str, object]:
    return dict(site.status()["daemon"])


def wait_unresponsive(site: Site) -> dict[str, object]:
    return dict(
        wait_for(
            lambda: (d := liveness(site))["responding"] is False and d,
            timeout=STALE_SECONDS + 45,
            what="status to see the daemon not responding",
        )
    )


def test_status_says_a_frozen_daemon_is_not_responding_and_running_again_once_it_thaws(site: Site) -> None:
    # Given a running daemon, seen as running and responding
    daemon = site.start_daemon()
    assert liveness(site)["responding"] is True
    assert "daemon: running (pid" in site.cli("status").stdout
    with frozen(daemon):
        # When it is frozen, Then status (which works without it) says so, with the heartbeat's age
        seen = wait_unresponsive(site)
        assert seen["running"] is True and seen["pid"] == daemon.pid
        assert float(seen["heartbeat_age"]) > STALE_SECONDS  # type: ignore[arg-type]
        text = site.cli("status")
        assert text.returncode == 0, text.stderr
        assert "daemon: NOT RESPONDING for " in text.stdout
        assert f"(pid {daemon.pid}: frozen or overloaded" in text.stdout
        assert "running (pid" not in text.stdout
    # When it thaws, Then it is running and responding again
    wait_for(lambda: liveness(site)["responding"] is True, what="the daemon to respond again")


def test_a_frozen_daemons_active_run_is_shown_as_not_progressing(site: Site) -> None:
    # Given a run waiting for approval
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    with frozen(daemon):
        wait_unresponsive(site)
        # Then status warns that the run does not progress
        assert "WARNING: the daemon is not responding: this run is not progressing" in site.cli("status").stdout


@pytest.mark.parametrize(
    "command",
    [("approve", "1"), ("retry", "1"), ("rollback", "1")],
    ids=["approve", "retry", "rollback"],  # resolve takes approve's way; rollback waits on the heartbeat
)
def test_a_control_command_against_a_frozen_daemon_fails_in_one_line_with_exit_3(
    site: Site, command: tuple[str, ...]
) -> None:
    # Given a run waiting for approval, and the daemon frozen
    site.write_config(policy={"require_approval": True})
    daemon = site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    with frozen(daemon):
        # When the operator runs a control command
        result = site.cli(*command, timeout=120)
        # Then it fails in one line, naming the silence, with exit 3 (not a traceback after 30 s)
        assert result.returncode == 3, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "the dropgate daemon did not answer within 15 s" in result.stderr
        assert "frozen or overloaded" in result.stderr
    # When it thaws, Then the request it finds waiting is not carried out: its sender was told it failed
    wait_for(lambda: liveness(site)["responding"] is True, what="the daemon to respond again")
    wait_for(
        lambda: "came after its sender had stopped waiting" in daemon.output(),
        what="the daemon to refuse the stale request",
    )
    run = site.run(1)
    assert run is not None and run["step"] == "approval" and run["outcome"] is None
    assert [r["id"] for r in site.history()] == [1]  # no retry queued
    # and a fresh command works
    approved = site.cli("approve", "1")
    assert approved.returncode == 0, approved.stderr
    assert site.wait_outcome(1)["outcome"] == "succeeded"


def test_a_control_command_against_a_frozen_daemon_with_a_full_queue_fails_at_once_with_exit_3(site: Site) -> None:
    # Given a frozen daemon whose control socket's queue is full of unanswered connections
    daemon = site.start_daemon()
    held: list[socket.socket] = []
    with frozen(daemon):
        try:
            for _ in range(64):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect(str(site.state / "control.sock"))
                except BlockingIOError:
                    sock.close()
                    break
                held.append(sock)
            # When the operator runs a control command
            started = time.monotonic()
            result = site.cli("resolve", "1", "--note", "checked", timeout=120)
            waited = time.monotonic() - started
            # Then it fails in one line with exit 3
            assert result.returncode == 3, result.stdout + result.stderr
            assert "does not accept connections" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1
            assert waited < 60  # not the 30 s read timeout of old plus more: the connection itself failed
        finally:
            for sock in held:
                sock.close()


def test_status_json_reports_the_heartbeat_of_a_running_daemon(site: Site) -> None:
    # Given a running daemon
    site.start_daemon()
    # Then status --json has the heartbeat, a few seconds old at most, and moving
    first = json.loads(site.cli("status", "--json").stdout)["daemon"]
    assert first["responding"] is True
    assert 0 <= first["heartbeat_age"] < STALE_SECONDS
    wait_for(lambda: liveness(site)["heartbeat"] > first["heartbeat"], what="the heartbeat to move")  # type: ignore[operator]
    # and once the daemon is stopped, status says it is not running, whatever the heartbeat file says
    site.daemons[0].stop()
    stopped = liveness(site)
    assert stopped["running"] is False and stopped["responding"] is None
