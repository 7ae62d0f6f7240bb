"""The daemon's life: one per state folder, metrics over HTTP, the control socket, readiness."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Site, wait_for
from tests.servers import self_signed


def test_a_second_daemon_on_the_same_state_folder_is_refused_naming_the_first(site: Site) -> None:
    first = site.start_daemon()
    second = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(site.config_path), "run"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert second.returncode == 2
    assert f"another dropgate daemon (pid {first.pid}) holds" in second.stderr
    assert first.alive()


def test_metrics_are_served_on_the_listener(site: Site) -> None:
    site.start_daemon()
    text = site.metrics_text() or ""
    for name in (
        'dropgate_gate{dropgate_gate="idle"} 1.0',
        'dropgate_step{dropgate_step="none"} 1.0',
        "dropgate_step_started_timestamp_seconds 0.0",
        "dropgate_blocked 0.0",
        "dropgate_inbox_files 0.0",
        'dropgate_runs_total{outcome="succeeded"} 0.0',
        'dropgate_build_info{version="',
    ):
        assert name in text, name
    heartbeat = site.metric("dropgate_heartbeat_timestamp_seconds")
    assert heartbeat
    wait_for(
        lambda: (site.metric("dropgate_heartbeat_timestamp_seconds") or 0) > heartbeat, what="the heartbeat to move"
    )


def test_commands_that_change_something_need_the_daemon(site: Site) -> None:
    # Given a site whose daemon ran once (it made the journal) and is stopped now
    site.start_daemon().stop()
    result = site.cli("resolve", "1", "--note", "checked")
    assert result.returncode == 3
    assert "the dropgate daemon is not running" in result.stderr
    # while read-only commands work without it, from the journal
    assert site.cli("status").returncode == 0
    assert "daemon: NOT RUNNING" in site.cli("status").stdout


def test_the_control_socket_is_only_for_root_and_the_admin_group(site: Site) -> None:
    site.start_daemon()
    sock = site.state / "control.sock"
    mode = sock.stat().st_mode & 0o777
    assert mode == 0o660
    assert sock.stat().st_gid == 0  # the configured admin group (root in this sandbox)


def test_systemd_readiness_and_watchdog_are_announced(site: Site, tmp_path: Path) -> None:
    # Given a NOTIFY_SOCKET as systemd would provide, and a watchdog of 2 s
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(30)
    try:
        daemon = site.start_daemon(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"})
        messages: list[str] = []

        def heard(text: str) -> bool:
            while not any(text in m for m in messages):
                messages.append(listener.recv(4096).decode())
            return True

        # Then the daemon says READY=1, a STATUS= line and keeps pinging WATCHDOG=1
        assert heard("READY=1")
        assert heard("STATUS=gate idle")
        assert heard("WATCHDOG=1")
        daemon.stop()
        assert heard("STOPPING=1")
    finally:
        listener.close()


def test_sigterm_stops_an_idle_daemon_cleanly(site: Site) -> None:
    daemon = site.start_daemon()
    assert daemon.stop() == 0
    assert not (site.state / "control.sock").exists()


def test_the_status_page_and_json_are_served_read_only(site: Site) -> None:
    import json
    import urllib.error
    import urllib.request

    site.start_daemon()
    base = f"http://127.0.0.1:{site.port}"
    with urllib.request.urlopen(base + "/", timeout=5) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert "<title>dropgate — update status</title>" in page
    assert '<script src="status.js" defer></script>' in page  # which refreshes the page from status.json
    with urllib.request.urlopen(base + "/status.json", timeout=5) as response:
        status = json.loads(response.read())
    assert status["gate"] == "idle"
    assert status["installed_version"] == "1.0.0"
    assert status["daemon"]["running"] is True
    with urllib.request.urlopen(base + "/history.json", timeout=5) as response:
        assert json.loads(response.read()) == []
    request = urllib.request.Request(base + "/status.json", data=b"{}", method="POST")
    try:
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as error:
        assert error.code == 501  # nothing on this listener changes anything
    else:
        raise AssertionError("a POST was accepted")


def test_metrics_can_be_served_over_tls_only(site: Site, tmp_path: Path) -> None:
    import ssl
    import urllib.error
    import urllib.request

    # Given metrics.tls with a certificate
    cert, key = self_signed(tmp_path)
    site.write_config(metrics={"tls": {"cert": str(cert), "key": str(key)}})
    site.start_daemon(wait=False)
    context = ssl.create_default_context(cafile=str(cert))

    def scrape() -> str | None:
        try:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{site.port}/metrics", context=context, timeout=5
            ) as response:
                return str(response.read().decode())
        except OSError:
            return None

    # Then a client that trusts it scrapes over HTTPS
    text = wait_for(scrape, what="metrics over HTTPS")
    assert 'dropgate_gate{dropgate_gate="idle"} 1.0' in text
    # and plain HTTP gets nothing
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{site.port}/metrics", timeout=5)
    except (urllib.error.URLError, ConnectionError) as error:
        assert error is not None
    else:
        raise AssertionError("plain HTTP was answered on a TLS listener")
    # and the listener still serves after that failed handshake
    assert scrape() is not None


def test_a_silent_client_does_not_stall_the_tls_listener(site: Site, tmp_path: Path) -> None:
    import ssl
    import urllib.request

    cert, key = self_signed(tmp_path)
    site.write_config(metrics={"tls": {"cert": str(cert), "key": str(key)}})
    site.start_daemon(wait=False)
    context = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{site.port}/status.json"

    def scrape() -> bytes | None:
        try:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            return None

    wait_for(scrape, what="the TLS listener")
    # Given a client that connects and never starts its handshake
    with socket.create_connection(("127.0.0.1", site.port)):
        # Then others are still served meanwhile
        assert scrape() is not None


def test_a_request_the_daemon_refuses_unread_is_never_reported_as_done(site: Site) -> None:
    # Given a running daemon, and requests too large for its control socket (it answers
    # "bad request" after 64 KiB and closes without reading the rest)
    site.start_daemon()
    for size in (70_000, 120_000):
        # When an operator sends one
        result = site.cli("resolve", "1", "--note", "x" * size)
        # Then the refusal is what they read: one line, exit 1, never a silent exit 0
        assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.strip().splitlines() == ["dropgate: bad request: message too long"], result.stderr


def test_dropgate_history_piped_into_a_reader_that_stops_ends_quietly(site: Site) -> None:
    # Given a journal with runs to list
    site.start_daemon()
    for version in ("0.9.0", "0.9.1", "0.9.2"):
        site.drop(site.pack(version))  # downgrades: each is rejected at once, and listed
    wait_for(lambda: len(site.history()) >= 3, what="three runs")
    # When the output goes to a reader that has already gone (`| true` exits at once)
    command = f"{sys.executable} -m pipeline --config {site.config_path} history"
    result = subprocess.run(["/bin/sh", "-c", f"{command} | true; echo $?"], capture_output=True, text=True)
    # Then there is no traceback and no error message
    assert "Traceback" not in result.stderr and "dropgate:" not in result.stderr, result.stderr
