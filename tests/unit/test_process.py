"""The one subprocess runner: output to the log line by line, progress fd, deadline and cancel kill the group."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.errors import CommandFailed, StepAborted, StepTimeout
from pipeline.journal import Journal
from pipeline.process import CancelToken, record_commands_in, run_command
from pipeline.sessions import boot_id, start_ticks
from tests.conftest import wait_for


def test_output_goes_to_the_log_line_by_line_with_the_context_environment() -> None:
    lines: list[str] = []
    run_command(
        ["sh", "-c", 'echo "run $DROPGATE_RUN_ID"; echo oops >&2'],
        log=lines.append,
        what="hook",
        env={"DROPGATE_RUN_ID": "7"},
    )
    assert "[hook] run 7" in lines
    assert "[hook] oops" in lines
    assert lines[-1].startswith("[hook] exit 0 after")


def test_a_failing_command_names_itself_and_its_exit_code() -> None:
    with pytest.raises(CommandFailed, match=r"^migration 002 failed with exit code 3$"):
        run_command(["sh", "-c", "exit 3"], log=lambda _: None, what="migration 002")


def test_a_missing_program_is_a_clear_failure() -> None:
    with pytest.raises(CommandFailed, match=r"cannot start '/nonexistent/tool'"):
        run_command(["/nonexistent/tool"], log=lambda _: None, what="restart")


def test_progress_lines_from_the_progress_fd_are_reported() -> None:
    seen: list[tuple[float, str | None]] = []
    script = (
        'echo \'{"progress": 0.4, "message": "reindexing"}\' >/dev/fd/$DROPGATE_PROGRESS_FD; '
        "echo garbage >/dev/fd/$DROPGATE_PROGRESS_FD"
    )
    lines: list[str] = []
    run_command(["sh", "-c", script], log=lines.append, on_progress=lambda r, m: seen.append((r, m)))
    assert seen == [(0.4, "reindexing")]
    assert any("ignored a progress line" in line for line in lines)


def _pid_from(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip(), what="the child to write its pid"))


def _wait_gone(pid: int, what: str) -> None:
    """Wait until process `pid` has ended (gone, or a zombie its parent has not reaped yet)."""
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, what=what)


def test_the_deadline_kills_the_whole_process_group(tmp_path: Path) -> None:
    # Given a hook that starts a background child and then hangs
    pidfile = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    lines: list[str] = []
    # When its deadline passes
    with pytest.raises(StepTimeout, match="still running at the step's time limit"):
        run_command(
            ["sh", "-c", script], log=lines.append, what="post_apply", deadline=time.time() + 1.0, grace_seconds=1.0
        )
    # Then the child is gone too
    child = _pid_from(pidfile)
    _wait_gone(child, "the child to die")
    assert any("killed (process group" in line for line in lines)


def test_cancel_stops_a_command_and_says_why(tmp_path: Path) -> None:
    token = CancelToken()
    timer = threading.Timer(0.5, lambda: token.cancel("aborted by a second SIGTERM"))
    timer.start()
    try:
        with pytest.raises(StepAborted, match="aborted by a second SIGTERM"):
            run_command(["sleep", "300"], log=lambda _: None, cancel=token, grace_seconds=1.0)
    finally:
        timer.cancel()


def test_stdout_can_stream_to_a_file_and_stdin_from_one(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(b"x" * 1_000_000)
    target = tmp_path / "out.txt"
    run_command(["cat"], log=lambda _: None, stdin_path=source, stdout_path=target)
    assert target.read_bytes() == source.read_bytes()
    assert os.stat(target).st_size == 1_000_000


def test_a_command_is_recorded_before_it_runs_and_forgotten_when_it_ends(tmp_path: Path) -> None:
    # Given the daemon's ledger (a real journal) installed, and a command that waits for `go`
    journal = Journal(tmp_path / "journal.db")
    go, ran = tmp_path / "go", tmp_path / "ran"
    record_commands_in(journal)
    worker = threading.Thread(
        target=run_command,
        args=(["sh", "-c", f'touch "{ran}"; while [ ! -e "{go}" ]; do sleep 0.05; done'],),
        kwargs={"log": lambda _: None, "what": "migration 1/1", "env": {"DROPGATE_RUN_ID": "7"}},
    )
    try:
        worker.start()
        wait_for(ran.exists, what="the command to run")
        # Then while it runs, the journal holds what finds it again: its session, start time and boot
        (record,) = journal.commands()
        assert (record.label, record.run_id) == ("migration 1/1", 7)
        assert record.start_ticks == start_ticks(record.pid) and record.boot_id == boot_id()
        assert record.pid in [m.pid for m in record.survivors()]
        go.touch()
        worker.join(timeout=30)
        # and once it ended, the record is gone
        assert journal.commands() == []
    finally:
        go.touch()
        worker.join(timeout=30)
        record_commands_in(None)
        journal.close()


def test_a_command_that_cannot_be_recorded_never_runs(tmp_path: Path) -> None:
    # Given a ledger that cannot be written (its journal was closed under it)
    journal = Journal(tmp_path / "journal.db")
    journal.close()
    ran = tmp_path / "ran"
    record_commands_in(journal)
    try:
        # When a command is asked for, the error comes back and the command did not run
        with pytest.raises(Exception, match="closed"):
            run_command(["touch", str(ran)], log=lambda _: None, what="migration 1/1")
    finally:
        record_commands_in(None)
    assert not ran.exists()


def test_what_a_finished_command_leaves_running_in_its_session_is_ended(tmp_path: Path) -> None:
    # Given a hook that starts a background child and exits at once
    pidfile = tmp_path / "child.pid"
    lines: list[str] = []
    run_command(["sh", "-c", f'sleep 300 & echo $! > "{pidfile}"'], log=lines.append, what="post-apply")
    # Then the child does not outlive it (it could change the platform after a rollback)
    child = _pid_from(pidfile)
    _wait_gone(child, "the child to end")
    assert any("ended 1 process it left running" in line for line in lines)


def test_a_service_start_may_leave_the_service_running(tmp_path: Path) -> None:
    pidfile = tmp_path / "service.pid"
    run_command(
        ["sh", "-c", f'sleep 300 & echo $! > "{pidfile}"'], log=lambda _: None, what="start 1/1", starts_services=True
    )
    service = _pid_from(pidfile)
    try:
        assert psutil.Process(service).status() != psutil.STATUS_ZOMBIE
    finally:
        os.kill(service, 9)


def test_a_program_that_is_not_executable_is_a_clear_failure(tmp_path: Path) -> None:
    script = tmp_path / "restart.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    with pytest.raises(CommandFailed, match=r"cannot start '.*restart.sh': Permission denied"):
        run_command([str(script)], log=lambda _: None, what="restart")
    with pytest.raises(CommandFailed, match=r"cannot start 'no-such-tool-here': No such file or directory"):
        run_command(["no-such-tool-here"], log=lambda _: None, what="restart")
