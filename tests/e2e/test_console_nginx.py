"""The console behind the shipped nginx snippet, answering while the platform shows its 503 page.

A real nginx on loopback includes deploy/nginx/dropgate-maintenance.conf (only
its site-specific paths and ports changed); a real update holds the platform
in maintenance (its migration waits for the test), and through nginx the
platform answers 503 while the console signs in, shows the run and follows it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Site, cannot_run, free_port, wait_for
from tests.console_helpers import Accounts, console_config, wait_console

SNIPPET = ROOT / "deploy" / "nginx" / "dropgate-maintenance.conf"


class Platform:
    """The platform behind nginx: answers every GET."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"the platform\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@dataclass
class Nginx:
    url: str
    flag: Path


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        cannot_run("nginx is not installed")
    return found


@pytest.fixture
def nginx(site: Site, accounts: Accounts, tmp_path: Path) -> Iterator[Nginx]:
    binary = nginx_binary()
    console_port = console_config(site, accounts)
    folder = tmp_path / "nginx"
    (folder / "page").mkdir(parents=True)
    shutil.copy(ROOT / "deploy" / "nginx" / "maintenance.html", folder / "page" / "maintenance.html")
    flag = site.root / "run" / "maintenance"
    snippet = SNIPPET.read_text()
    for shipped, here in (
        ("/run/dropgate/maintenance", str(flag)),
        ("root /opt/dropgate/share/nginx;", f"root {folder / 'page'};"),
        ("127.0.0.1:9108", f"127.0.0.1:{site.port}"),
        ("127.0.0.1:9109", f"127.0.0.1:{console_port}"),
    ):
        assert shipped in snippet, shipped
        snippet = snippet.replace(shipped, here)
    (folder / "dropgate.conf").write_text(snippet)
    platform = Platform()
    port = free_port()
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = "\n".join(f"    {kind}_temp_path {folder / kind};" for kind in kinds)
    (folder / "nginx.conf").write_text(
        # master_process off: one process, no workers, no user switch; for a test server only
        f"daemon off;\nmaster_process off;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\n"
        "events { worker_connections 64; }\n"
        "http {\n    access_log off;\n" + temp + "\n"
        f"    server {{\n        listen 127.0.0.1:{port};\n"
        f"        include {folder / 'dropgate.conf'};\n"
        f"        location / {{ proxy_pass http://127.0.0.1:{platform.port}; }}\n    }}\n}}\n"
    )
    command = [binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"nginx exited: {(folder / 'error.log').read_text()}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, timeout=30, what="nginx to listen")
        yield Nginx(f"http://127.0.0.1:{port}", flag)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        platform.stop()


def test_the_console_answers_through_nginx_while_the_platform_is_in_maintenance(
    site: Site, accounts: Accounts, nginx: Nginx
) -> None:
    # Given an update whose migration holds the platform in maintenance until the test lets it go
    release = site.root / "let-the-migration-finish"
    site.start_daemon()
    wait_console(int(site.config["console"]["listen"].rsplit(":", 1)[1]))
    archive = site.pack(
        "1.1.0",  # a minor version: it needs downtime
        files={"migrations/0001-wait.sh": f"#!/bin/sh\nwhile [ ! -e {release} ]; do sleep 0.1; done\n"},
        migrations=["migrations/0001-wait.sh"],
    )
    with httpx.Client(base_url=nginx.url, follow_redirects=False, timeout=60) as http:
        # When the administrator signs in through nginx (claiming another address, which nginx overwrites)
        assert http.get("/dropgate/console").headers["location"].endswith("/dropgate/console/")
        answer = http.get("/dropgate/console/")
        assert answer.status_code == 303 and answer.headers["location"] == "/dropgate/console/signin"
        page = http.get("/dropgate/console/signin")
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        answer = http.post(
            "/dropgate/console/signin",
            data={"csrf": token, "account": accounts.admin, "password": accounts.admin_password, "next": ""},
            headers={"X-Forwarded-For": "203.0.113.9"},
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/dropgate/console/"
        assert "Path=/dropgate/console" in answer.headers["set-cookie"]
        # and imports the archive through nginx (streamed through, not buffered)
        token = re.search(r'name="csrf" value="([^"]+)"', http.get("/dropgate/console/import").text).group(1)  # type: ignore[union-attr]
        answer = http.post(
            "/dropgate/console/import", data={"csrf": token}, files={"archive": (archive.name, archive.read_bytes())}
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/dropgate/console/uploads/1"
        # Then, once the update is in maintenance, the platform answers 503 with the maintenance page
        wait_for(nginx.flag.exists, timeout=60, what="the maintenance flag")
        site.wait_step(1, "apply")
        platform = http.get("/reports/today")
        assert platform.status_code == 503 and "The platform is being updated" in platform.text
        # and the console answers through nginx: the overview, and the run's live page in apply
        overview = http.get("/dropgate/console/")
        assert overview.status_code == 200
        assert 'href="/dropgate/console/runs/1"' in overview.text and "maintenance ON" in overview.text
        run_page = http.get("/dropgate/console/runs/1")
        assert run_page.status_code == 200 and '<li class="current"><strong>apply</strong>' in run_page.text
        assert http.get("/dropgate/").status_code == 200  # and the read-only status page too
        # When the migration is let go, Then the update ends well and the platform answers again
        release.touch()
        assert site.wait_outcome(1)["outcome"] == "succeeded"
        wait_for(lambda: http.get("/reports/today").status_code == 200, what="the platform back in service")
        assert "badge succeeded" in http.get("/dropgate/console/runs/1").text
    # and the daemon recorded the upload as coming from nginx's client address, not the claimed one
    log = site.daemons[0].output()
    assert f"{accounts.admin} from 127.0.0.1 (console) uploaded gts.1.1.0.tgz" in log
    assert "203.0.113.9" not in log
