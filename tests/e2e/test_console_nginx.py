"""The console behind the shipped nginx snippet, answering while the platform shows its 503 page.

A real nginx on loopback includes deploy/nginx/dropgate-maintenance.conf (only
its site-specific paths and ports changed); a real update holds the platform
in maintenance (its migration waits for the test), and through nginx the
platform answers 503 while the console signs in, shows the run and follows it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Site, wait_for
from tests.console_helpers import Accounts, console_config, wait_console
from tests.servers import PlatformBackend, maintenance_nginx


@dataclass
class Nginx:
    url: str
    flag: Path


@pytest.fixture
def nginx(site: Site, accounts: Accounts, tmp_path: Path) -> Iterator[Nginx]:
    console_port = console_config(site, accounts)
    flag = site.root / "run" / "maintenance"
    platform = PlatformBackend(b"the platform\n")
    try:
        with maintenance_nginx(
            tmp_path / "nginx", flag, {9108: site.port, 9109: console_port}, platform.port
        ) as url:
            yield Nginx(url, flag)
    finally:
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
