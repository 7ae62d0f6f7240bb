"""The one subprocess runner: output to the log line by line, progress fd, deadline and cancel kill the group."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from pipeline.errors import CommandFailed, StepAborted, StepTimeout
from pipeline.process import CancelToken, run_command
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
    wait_for(
        lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
        what="the child to die",
    )
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
