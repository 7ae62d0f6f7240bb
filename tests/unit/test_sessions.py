"""Sessions identified for sure (pid, start time, boot) and ended whole, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.sessions import CommandRecord, boot_id, end_session, process_info, session_members, start_ticks
from tests.conftest import wait_for


@pytest.fixture
def session(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """A session whose leader exits at once, leaving a child (`sleep`) in it: (leader pid, child pid)."""
    pidfile = tmp_path / "child.pid"
    leader = subprocess.Popen(
        ["sh", "-c", f'sleep 300 & echo $! > "{pidfile}"; exit 0'], start_new_session=True
    )
    leader.wait(timeout=30)
    child = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the child"))
    yield leader.pid, child
    for member in session_members(leader.pid):
        os.kill(member.pid, signal.SIGKILL)


def record(pid: int, ticks: int, boot: str | None = None) -> CommandRecord:
    return CommandRecord("t", "migration 1/1", "sh -c ...", pid, ticks, boot if boot is not None else boot_id(), 0.0)


def test_a_living_leader_is_found_by_pid_and_start_time() -> None:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        ticks = start_ticks(proc.pid)
        assert ticks is not None
        info = process_info(proc.pid)
        assert info is not None and info.session == proc.pid and info.group == proc.pid
        assert [m.pid for m in record(proc.pid, ticks).survivors()] == [proc.pid]
        # a record of the same pid with another start time is another process: not ours
        assert record(proc.pid, ticks + 1).survivors() == []
        # a record from another boot of the machine: nothing of it can be left
        assert record(proc.pid, ticks, boot="another-boot").survivors() == []
    finally:
        proc.kill()
        proc.wait()


def test_the_survivors_of_a_dead_leader_are_found_by_its_session(session: tuple[int, int]) -> None:
    leader, child = session
    # The leader is gone (reaped); its pid stays held by the session the child is in
    assert process_info(leader) is None
    found = record(leader, 12345).survivors()
    assert [m.pid for m in found] == [child]


def test_ending_a_session_takes_everything_in_it(session: tuple[int, int]) -> None:
    leader, child = session
    ending = end_session(lambda: session_members(leader), grace_seconds=2.0)
    assert ending.left == [] and ending.processes == 1 and not ending.killed
    wait_for(lambda: process_info(child) is None or process_info(child).dead, what="the child to die")  # type: ignore[union-attr]


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        ["sh", "-c", f'trap "" TERM; touch "{ready}"; while :; do sleep 0.1; done'], start_new_session=True
    )
    try:
        wait_for(ready.exists, what="the trap to be set")
        ending = end_session(lambda: session_members(proc.pid), grace_seconds=0.5, reap=proc.poll)
        assert ending.killed and ending.left == []
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_this_process_is_never_a_member_of_anything_it_ends() -> None:
    assert all(member.pid != os.getpid() for member in session_members(os.getsid(0)))
