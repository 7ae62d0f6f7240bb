"""The status page over real HTTP, and rendered by a real headless browser (chromium) under its own CSP.

The page must say what happened (a rollback changed the platform and put it
back), say how to unblock the gate, show the newest lines of its log box, and
be served with headers that keep it from being framed or running injected
script.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import pytest

from tests.conftest import Site, require_tool, wait_for
from tests.support import rendered


def fetch(url: str, *, method: str = "GET") -> tuple[int, Message, bytes]:
    request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def failing_migration(site: Site) -> Path:
    return site.pack(
        "1.0.1", files={"migrations/001.sh": "#!/bin/sh\necho 'relation users does not exist' >&2\nexit 3\n"},
        migrations=["migrations/001.sh"],
    )


@pytest.mark.parametrize("path", ["/", "/index.html", "/status.js", "/status.css", "/status.json", "/metrics"])
def test_every_answer_carries_the_security_headers_and_no_python_version(site: Site, path: str) -> None:
    site.start_daemon()
    status, headers, _ = fetch(f"http://127.0.0.1:{site.port}{path}")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == "dropgate"


@pytest.mark.parametrize(("path", "method", "code"), [("/nothing-here", "GET", 404), ("/status.json", "POST", 501)])
def test_errors_carry_the_headers_too(site: Site, path: str, method: str, code: int) -> None:
    site.start_daemon()
    status, headers, _ = fetch(f"http://127.0.0.1:{site.port}{path}", method=method)
    assert status == code
    assert headers["X-Frame-Options"] == "DENY"
    assert "Python" not in headers["Server"] and "BaseHTTP" not in headers["Server"]


def test_the_page_has_no_inline_script_or_style_and_its_assets_have_their_types(site: Site) -> None:
    site.start_daemon()
    base = f"http://127.0.0.1:{site.port}"
    _, _, page = fetch(base + "/")
    html = page.decode()
    # every script is loaded from a file, and nothing is styled inline (the CSP would block both)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="' in attributes and not body.strip() for attributes, body in scripts)
    assert "<style" not in html and " style=" not in html and "javascript:" not in html
    _, js_headers, js = fetch(base + "/status.js")
    _, css_headers, _ = fetch(base + "/status.css")
    assert js_headers["Content-Type"].startswith("text/javascript")
    assert css_headers["Content-Type"].startswith("text/css")
    assert b"status.json" in js


def test_the_listener_queues_more_than_five_connections(site: Site) -> None:
    ss = require_tool("ss")
    site.start_daemon()
    # ss shows a listening socket's backlog in its Send-Q column
    result = subprocess.run([ss, "-ltnH", f"sport = :{site.port}"], capture_output=True, text=True, timeout=30)
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    assert len(rows) == 1, result.stdout
    assert int(rows[0][2]) > 5


def test_after_a_rollback_the_page_says_the_platform_was_changed_and_restored_and_how_to_unblock(
    site: Site, tmp_path: Path
) -> None:
    # Given an update whose migration fails: apply had begun, then the rollback put everything back
    site.start_daemon()
    site.drop(failing_migration(site))
    assert site.wait_outcome(1)["outcome"] == "rolled_back"
    status = site.status()
    # Then status (JSON and text) does not say "untouched": it was changed and restored
    assert status["run"]["platform"] == (
        "changed, then restored by the rollback (release, data and services as before the run)"
    )
    assert "platform: changed, then restored by the rollback" in site.cli("status").stdout
    # and the page, rendered by a browser under its CSP, says so, and shows the command that unblocks the gate
    dom = rendered(f"http://127.0.0.1:{site.port}/", tmp_path / "profile")
    assert 'class="gate blocked"' in dom
    assert "platform: changed, then restored by the rollback" in dom
    assert "platform: untouched" not in dom
    assert "<code>dropgate resolve 1 --note …</code>" in dom
    assert "<code>dropgate rollback 1</code>" in dom


def test_the_log_box_lists_the_newest_lines_last(site: Site, tmp_path: Path) -> None:
    # Given a run that has finished, with a long log
    site.start_daemon()
    site.drop(failing_migration(site))
    assert site.wait_outcome(1)["outcome"] == "rolled_back"
    status = site.status()
    # When the page shows it
    dom = rendered(f"http://127.0.0.1:{site.port}/", tmp_path / "profile")
    box = re.search(r'<pre id="events"[^>]*>(.*?)</pre>', dom, re.S)
    assert box is not None
    events_text, marker, log_text = html.unescape(box.group(1)).partition("\n-- log --\n")
    assert marker
    # Then the events come oldest first and end with the newest (the outcome)...
    events = status["run"]["events"]
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    shown = [line.split("  ", 1)[1] for line in events_text.strip().splitlines()]
    assert shown == [f"{e['step']}: {e['message']}" for e in events]
    assert shown[-1].startswith("rolled_back: outcome: rolled_back")
    # ...and the log follows, its newest line last: the end of the box
    assert log_text.strip().splitlines() == status["run"]["log_tail"]


def test_the_page_renders_a_running_update_with_its_progress(site: Site, tmp_path: Path) -> None:
    # Given a run waiting for approval
    site.write_config(policy={"require_approval": True})
    site.start_daemon()
    site.drop(site.pack("1.0.1"))
    site.wait_step(1, "approval")
    # When the page is rendered
    dom = rendered(f"http://127.0.0.1:{site.port}/", tmp_path / "profile")
    # Then the gate, the step and its bar are there (the bar's width set by script, no inline style in markup)
    assert 'class="gate busy"' in dom
    assert '<span class="now" title="running">approval</span>' in dom
    assert 'class="bar"' in dom and "overdue" not in dom
    status = json.loads(fetch(f"http://127.0.0.1:{site.port}/status.json")[2])
    assert status["run"]["overdue"] is False and status["run"]["overdue_seconds"] is None
    wait_for(lambda: site.cli("approve", "1").returncode == 0, what="the approval")
    assert site.wait_outcome(1)["outcome"] == "succeeded"
