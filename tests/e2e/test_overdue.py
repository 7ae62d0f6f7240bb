"""A step past its time limit is shown as overdue, in red: in `status`, in /status.json and on the page.

Before, such a step read "time limit in 0s" (CLI) and "time limit in -181 s"
with a calm badge (page). A live daemon ends a step at its limit, so a step
stays past it when the daemon cannot act: frozen (SIGSTOP) or dead (SIGKILL).
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Site, wait_for
from tests.support import rendered


@pytest.fixture
def waiting(site: Site) -> Iterator[Site]:
    """A run waiting for approval, whose time limit is 4 s."""
    site.write_config(policy={"require_approval": True, "timeouts": {"approval": "4s"}})
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    yield site


def run_status(site: Site) -> dict[str, Any]:
    return dict(site.status()["run"])


def status_on_a_terminal(site: Site) -> str:
    """`dropgate status` as an operator's terminal shows it (a real pseudo-terminal: colours on)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "--config", str(site.config_path), "status"],
            stdout=follower, stderr=follower, cwd=ROOT, env={**os.environ, "TERM": "xterm"},
        )
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            output += chunk
        proc.wait(timeout=60)
    finally:
        os.close(leader)
    return output.decode()


def test_a_step_within_its_time_limit_is_not_overdue(waiting: Site) -> None:
    run = run_status(waiting)
    assert run["overdue"] is False and run["overdue_seconds"] is None
    assert "time limit in " in waiting.cli("status").stdout


def test_a_frozen_daemons_step_past_its_limit_is_overdue_in_status_and_json(waiting: Site) -> None:
    site = waiting
    daemon = site.daemons[0]
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        # When the step's time limit passes while the daemon cannot act
        run = wait_for(lambda: (r := run_status(site))["overdue"] and r, what="the step to be overdue")
        # Then JSON says it, with by how much
        assert run["overdue_seconds"] > 0
        assert run["step"] == "approval" and run["outcome"] is None
        # and the text says OVERDUE by ..., and when the limit passed, not "time limit in 0s"
        text = site.cli("status").stdout
        assert "OVERDUE by " in text and "its time limit passed at " in text
        assert "time limit in" not in text
        assert "\x1b[" not in text  # no colour when the output is not a terminal
        # and on a terminal, in red
        assert "\x1b[1;31mOVERDUE by " in status_on_a_terminal(site)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    # When it thaws, the time limit ends the step, and nothing is overdue any more
    assert site.wait_outcome(1)["outcome"] == "rejected"
    assert run_status(site)["overdue"] is False


def test_a_dead_daemons_step_past_its_limit_is_overdue(waiting: Site) -> None:
    site = waiting
    site.daemons[0].kill()
    run = wait_for(lambda: (r := run_status(site))["overdue"] and r, what="the step to be overdue")
    assert run["overdue_seconds"] > 0
    text = site.cli("status").stdout
    assert "daemon: NOT RUNNING" in text and "OVERDUE by " in text


class Page:
    """The real page's files and a real daemon's status.json captured at a moment, served from loopback."""

    def __init__(self, status: dict[str, Any]) -> None:
        package = resources.files("pipeline")
        files = {
            "/": (package.joinpath("status.html").read_bytes(), "text/html"),
            "/status.js": (package.joinpath("status.js").read_bytes(), "text/javascript"),
            "/status.css": (package.joinpath("status.css").read_bytes(), "text/css"),
            "/status.json": (json.dumps(status).encode(), "application/json"),
            "/history.json": (b"[]", "application/json"),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body, kind = files.get(self.path, (b"", "text/plain"))
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'self'; "
                                 "style-src 'self'; connect-src 'self'")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_page_shows_an_overdue_step_in_red(waiting: Site, tmp_path: Path) -> None:
    # Given the status of a step past its limit, as a real (here frozen) daemon's status.json has it
    site = waiting
    daemon = site.daemons[0]
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: run_status(site)["overdue"], what="the step to be overdue")
        status = site.status()
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    # When the page renders it (the daemon serves the same files; frozen, it could not serve them)
    page = Page(status)
    try:
        dom = rendered(page.url, tmp_path / "profile")
    finally:
        page.close()
    # Then the step's chip and its bar are red, and it says by how much it is overdue
    assert '<span class="overdue">overdue by ' in dom
    assert '<span class="late" title="past its time limit">approval</span>' in dom
    assert 'class="bar late"' in dom
    assert "time limit in" not in dom
